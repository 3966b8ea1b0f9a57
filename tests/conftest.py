import os
import warnings

# Without CUDA, Triton kernels run in its interpreter. The mode is fixed when triton.language is first imported
# (its @jit helpers become interpreted functions), so it is set here, before any test module imports anything.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


# Triton's interpreter holds a kernel's scalars as one-element numpy arrays, which numpy >= 2.4 will not take as
# range() bounds: the shim the bench scripts use, installed once for every test (harmless where nothing is
# interpreted; NOFLASH_TUNE_TEST_INTERPRET may ask for the interpreter later, on a GPU machine).
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
try:
    from bench._shared import interpreter_scalars_as_indices as _scalars_as_indices  # noqa: E402

    _scalars_as_indices()
except ImportError:  # pragma: no cover - no triton, or one without an interpreter
    pass

import pytest
from hypothesis import settings

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a red build is a change's doing
# and not a new draw; elsewhere each run draws afresh and explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

# Tests never touch the user's real cache or config dirs, and never see configs from the environment.
_TMP = os.environ.setdefault("NOFLASH_TUNE_TEST_ROOT", "")


@pytest.fixture(autouse=True)
def _fresh_candidates():
    """Each test prunes afresh: the tuner caches a shape's candidates per process, and tests patch the rules."""
    from noflash_tune import tuner

    tuner.clear_candidate_caches()
    yield


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


class RuntimeEnv:
    """pytest's monkeypatch, whose setenv/delenv take effect at once: the runtime reads NOFLASH_TUNE_* at import and
    at noflash_tune.clear_cache() (not on every call), so each change is followed by a clear_cache()."""

    def __init__(self, mp):
        self._mp = mp

    def setenv(self, *args, **kwargs):
        import noflash_tune

        self._mp.setenv(*args, **kwargs)
        noflash_tune.clear_cache()

    def delenv(self, *args, **kwargs):
        import noflash_tune

        self._mp.delenv(*args, **kwargs)
        noflash_tune.clear_cache()

    def __getattr__(self, name):
        return getattr(self._mp, name)


@pytest.fixture
def clean_runtime(monkeypatch):
    """Fresh dispatcher state; env vars set by the test are undone after it."""
    import noflash_tune

    noflash_tune.clear_cache()
    yield RuntimeEnv(monkeypatch)
    monkeypatch.undo()
    noflash_tune.clear_cache()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/pg_server.py: Debian's package, installed when missing and
    we are root with apt-get, as in CI); skipped with the reason when none can be had; stopped at the end."""
    from pg_server import PgServer, Unavailable

    server = PgServer()
    try:
        server.start()
    except Unavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """The SQLAlchemy URL (``postgresql+psycopg2://postgres@127.0.0.1:PORT/DB``) of a fresh empty database."""
    return postgres_server.new_database()


@pytest.fixture
def rt(clean_runtime, tmp_path):
    """The patch on, fresh dispatcher state, and no config anywhere (not even a shipped one) unless a test writes one:
    each test decides what the dispatcher knows."""
    import noflash_tune
    from noflash_tune import paths

    mp = clean_runtime
    empty = tmp_path / "shipped"
    empty.mkdir()
    mp.setattr(paths, "shipped_configs_dir", lambda: empty)
    mp.setenv("NOFLASH_TUNE_USER_DIR", str(tmp_path / "user"))
    for name in ("NOFLASH_TUNE_CONFIGS", "NOFLASH_TUNE_FORCE", "NOFLASH_TUNE_VRAM_CAP"):
        mp.delenv(name, raising=False)
    noflash_tune.enable()
    yield mp
    noflash_tune.enable()
