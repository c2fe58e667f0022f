"""Matrix expansion: cartesian product, exclude then include, readable unique ids, load keys."""

from __future__ import annotations

from harness import expand, group_by_load, parse_scenario


def _expand(matrix: dict) -> list:
    return expand(parse_scenario({"name": "m", "matrix": matrix}, "scenarios/m.yaml"))


def test_cartesian_product_in_axis_order() -> None:
    cells = _expand({"batch": [1, 2], "source": ["hub", "safetensors"], "steps": 4})
    assert [(c.source, c.batch) for c in cells] == [
        ("hub", 1),
        ("hub", 2),
        ("safetensors", 1),
        ("safetensors", 2),
    ]
    assert all(c.steps == 4 for c in cells)
    assert [c.id for c in cells] == [
        "diffusers-hub-b1",
        "diffusers-hub-b2",
        "diffusers-safetensors-b1",
        "diffusers-safetensors-b2",
    ]
    assert cells[0].nodeid == "scenarios/m.yaml::diffusers-hub-b1"


def test_exclude_removes_matching_combinations_only() -> None:
    cells = _expand(
        {
            "offload": ["none", "medvram"],
            "source": ["hub", "safetensors"],
            "batch": [1, 4],
            "exclude": [{"offload": "medvram", "source": "safetensors"}],
        }
    )
    combos = {(c.offload, c.source, c.batch) for c in cells}
    assert len(cells) == 6
    assert ("medvram", "safetensors", 1) not in combos
    assert ("medvram", "hub", 4) in combos and ("none", "safetensors", 4) in combos


def test_include_adds_cells_with_first_values_and_is_not_excluded() -> None:
    cells = _expand(
        {
            "sampler": ["euler", "heun"],
            "batch": [1, 2],
            "exclude": [{"sampler": "ddim"}, {"sampler": "heun", "batch": 2}],
            "include": [{"sampler": "ddim", "batch": 8}, {"sampler": "euler", "batch": 1}],
        }
    )
    combos = [(c.sampler, c.batch) for c in cells]
    # exclude runs before include (as in CI matrices); the duplicate include is dropped
    assert combos == [("euler", 1), ("euler", 2), ("heun", 1), ("ddim", 8)]
    ddim = cells[-1]
    assert ddim.steps == 20 and ddim.resolution == (512, 512) and ddim.backend == "diffusers"


def test_ids_unique_and_readable() -> None:
    cells = _expand(
        {
            "backend": ["original", "diffusers"],
            "offload": ["none", "medvram"],
            "resolution": [512, "768x512"],
            "guidance": [1, 7.5],
        }
    )
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids) == 16
    assert "original-medvram-768x512-cfg7.5" in ids
    assert "diffusers-nooffload-512x512-cfg1" in ids


def test_group_by_load_shares_sessions_across_batch_and_sampler() -> None:
    cells = _expand(
        {
            "source": ["hub", "ckpt"],
            "batch": [1, 2, 4],
            "sampler": ["euler", "ddim"],
            "dtype": ["fp32", "fp16"],
        }
    )
    groups = group_by_load(cells)
    assert len(groups) == 4  # source x dtype
    for group in groups:
        assert len(group) == 6
        assert len({c.load_key() for c in group}) == 1


def test_cell_round_trip() -> None:
    cell = _expand({"batch": 3})[0]
    assert type(cell).from_dict(cell.to_dict()) == cell


def test_cell_defaults_agree_with_the_schema() -> None:
    from dataclasses import MISSING, fields

    from harness.matrix import Cell
    from harness.scenario import AXES

    for field in fields(Cell):
        if field.name in AXES and field.default is not MISSING:
            assert field.default == AXES[field.name][1], field.name


def test_denoise_steps_follow_the_workflow() -> None:
    cells = _expand(
        {
            "steps": 10,
            "strength": 0.55,
            "workflow": ["txt2img", "img2img", "inpaint", "outpaint", "hires"],
        }
    )
    assert [c.denoise_steps for c in cells] == [10, 5, 5, 5, 15]
    assert [c.output_size for c in cells][-2:] == [(576, 576), (1024, 1024)]
