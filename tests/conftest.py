import os
import warnings

import pytest

# Tests never touch the user's real cache or config dirs, and never see configs from the environment.
_TMP = os.environ.setdefault("NOFLASH_TUNE_TEST_ROOT", "")


@pytest.fixture(autouse=True, scope="session")
def _isolated_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("noflash-tune-home")
    os.environ["NOFLASH_TUNE_CACHE_DIR"] = str(root / "cache")
    os.environ["NOFLASH_TUNE_USER_DIR"] = str(root / "user-configs")
    os.environ.pop("NOFLASH_TUNE_CONFIGS", None)
    os.environ.pop("NOFLASH_TUNE_FORCE", None)
    os.environ.pop("NOFLASH_TUNE_VRAM_CAP", None)
    warnings.filterwarnings("ignore", message=".*kernel not used because.*")
    warnings.filterwarnings("ignore", message=".*requires q,k,v to have the same last dimension.*")
    yield


@pytest.fixture
def clean_runtime(monkeypatch):
    """Fresh dispatcher state; env vars set by the test are undone after it."""
    import noflash_tune

    noflash_tune.clear_cache()
    yield monkeypatch
    noflash_tune.clear_cache()
