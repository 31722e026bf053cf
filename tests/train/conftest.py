from pathlib import Path

import pytest

from moh.train.config import RunConfig

REPO = Path(__file__).parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture
def smoke_cfg(tmp_path):
    """configs/smoke.yaml with its out_dir in tmp_path; call with extra ``a.b=v`` overrides."""

    def make(*overrides: str) -> RunConfig:
        return RunConfig.load(SMOKE, [f"train.out_dir={tmp_path / 'run'}", *overrides])

    return make
