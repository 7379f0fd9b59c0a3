"""params.yaml and dynaplan.config's defaults are one recipe."""

from pathlib import Path

from dynaplan.config import Params, load_params
from dynaplan.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_sets_every_key_at_its_code_default():
    """A params file that leaves a key out gets what `dvc repro` runs with the shipped
    params.yaml, so tuning a value there means moving its default in dynaplan.config with it."""
    shipped, defaults = flatten(load_params(ROOT / "params.yaml")), flatten(Params())
    assert shipped.keys() == defaults.keys()
    differ = {key: (value, defaults[key]) for key, value in shipped.items() if value != defaults[key]}
    assert differ == {}, f"params.yaml value vs dynaplan.config default: {differ}"
