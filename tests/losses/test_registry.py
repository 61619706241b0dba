"""The registry: the lab's implementations and the peers, built by name, with clear errors for bad names and options."""

import pytest
import yaml
from helpers import README_LOSS_TABLES, REPO, names_in, readme_table

from losslab.losses import LOSSES, TokenLoss, build_loss

from .reference import IMPLEMENTATIONS

OPTIONS = dict(
    ignore_index=-1,
    reduction="sum",
    label_smoothing=0.1,
    z_loss=1e-4,
    softcap=30.0,
    check_targets=False,
    return_parts=True,
)
INVALID = {  # id: (option, value, text the message must hold)
    "reduction=avg": ("reduction", "avg", "avg"),
    "reduction=None": ("reduction", None, "None"),
    "label_smoothing=-0.1": ("label_smoothing", -0.1, "-0.1"),
    "label_smoothing=1.5": ("label_smoothing", 1.5, "1.5"),
    "z_loss=-1": ("z_loss", -1.0, "-1"),
    "softcap=0": ("softcap", 0.0, "softcap"),
    "softcap=-30": ("softcap", -30.0, "-30"),
    "temperature=0": ("temperature", 0.0, "> 0"),
    "temperature=-1": ("temperature", -1.0, "-1"),
    "temperature=inf": ("temperature", float("inf"), "finite"),
    "temperature=nan": ("temperature", float("nan"), "nan"),
    "temperature='hot'": ("temperature", "hot", "temperature=hot: must be a finite number"),
    "z_loss='abc'": ("z_loss", "abc", "z_loss=abc: must be a finite number"),  # not a TypeError from `<`
    "softcap='None'": ("softcap", "None", "softcap=None: must be a finite number"),
    "label_smoothing=True": ("label_smoothing", True, "label_smoothing=true: must be a number"),
}


@pytest.mark.whole_registry
def test_the_registry_and_conf_loss_hold_the_same_entries():
    """A conf/loss/<name>.yaml for every registry entry, and no other: ``loss=<name>`` is what a user types."""
    configs = sorted(path.stem for path in (REPO / "conf" / "loss").glob("*.yaml"))
    assert configs == sorted(LOSSES)
    assert len(set(LOSSES.values())) == len(LOSSES), "each name has its own implementation"


@pytest.mark.parametrize("entry", sorted(LOSSES))  # not "name": it runs for the peers that cannot run here too
def test_every_entry_has_what_the_readme_says_adding_one_takes(entry):
    """README, "Add a loss": a class that sets its name, a line in LOSSES (this test's parameters),
    conf/loss/<entry>.yaml built from the shared options; and the grid runs over it (the README's
    tables: the test below)."""
    assert LOSSES[entry].name == entry
    config = yaml.safe_load((REPO / "conf" / "loss" / f"{entry}.yaml").read_text())
    assert config["name"] == entry and config["defaults"][0] == "/base/loss@_here_"
    assert entry in IMPLEMENTATIONS  # the float64 reference grid


@pytest.mark.whole_registry
@pytest.mark.parametrize("table", README_LOSS_TABLES)
def test_the_readmes_loss_tables_list_every_registered_loss(table):
    header_start, names_are = README_LOSS_TABLES[table]
    cells = readme_table(header_start)
    names = cells[0][1:] if names_are == "columns" else [row[0] for row in cells[1:]]
    listed = [name for cell in names for name in names_in(cell)]
    missing, unknown = set(LOSSES) - set(listed), set(listed) - set(LOSSES)
    assert not missing and not unknown, (
        f"the README's table {header_start!r}: registered but not listed {sorted(missing)}, "
        f"listed but not registered {sorted(unknown)}"
    )


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_build_loss_by_name_with_every_option(name):
    """Every option each entry can honour; a peer refuses the others, naming the option and itself."""
    unsupported = set(getattr(LOSSES[name], "unsupported", ())) & set(OPTIONS)
    if unsupported:
        with pytest.raises(ValueError, match=rf"loss '{name}' cannot honour ({'|'.join(unsupported)})="):
            build_loss(name, **OPTIONS)
    options = {key: value for key, value in OPTIONS.items() if key not in unsupported}
    chunking = {"chunking_method": None} if name == "torch_lce" else {}  # torch smooths unchunked only
    loss_fn = build_loss(name, **options, **chunking)
    assert type(loss_fn) is LOSSES[name] and isinstance(loss_fn, TokenLoss)
    for option, value in options.items():
        assert getattr(loss_fn, option) == value, option
    assert build_loss(name).reduction == "mean" and build_loss(name).ignore_index == -100


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        build_loss("cross-entropy")
    message = str(error.value)
    assert "cross-entropy" in message
    for name in IMPLEMENTATIONS:
        assert name in message


@pytest.mark.parametrize("option", ["label_smothing", "chunksize", "reduce"])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_unknown_option_is_named(name, option):
    with pytest.raises(ValueError, match=option):
        build_loss(name, **{option: 1})


@pytest.mark.parametrize("name", [name for name in IMPLEMENTATIONS if name != "fused"])
def test_chunk_size_is_only_for_fused(name):
    assert build_loss("fused", chunk_size=8).chunk_size == 8
    with pytest.raises(ValueError, match="chunk_size"):
        build_loss(name, chunk_size=8)


@pytest.mark.parametrize("case_id", INVALID)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_invalid_option_value_raises(name, case_id):
    option, value, text = INVALID[case_id]
    with pytest.raises(ValueError) as error:
        build_loss(name, **{option: value})
    assert option in str(error.value) and text in str(error.value)


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_invalid_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        build_loss("fused", chunk_size=chunk_size)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_boundary_values_are_valid(name):
    build_loss(name, label_smoothing=0.0, z_loss=0.0, softcap=None)
    unsupported = getattr(LOSSES[name], "unsupported", ())
    chunking = {"chunking_method": None} if name == "torch_lce" else {}
    build_loss(
        name,
        **({} if "label_smoothing" in unsupported else {"label_smoothing": 1.0}),
        **({} if "softcap" in unsupported else {"softcap": 1e-3}),
        **chunking,
    )


@pytest.mark.parametrize("entry", ["liger", "cce"])  # not "name": refused before it needs its package or GPU
def test_a_peer_that_soft_caps_refuses_a_temperature_with_a_soft_cap(entry):
    """It would cap the logits divided by the temperature (its input is), not divide the capped ones."""
    with pytest.raises(ValueError, match=rf"loss '{entry}' cannot honour temperature=0.5 with softcap=30.0"):
        build_loss(entry, softcap=30.0, temperature=0.5)
