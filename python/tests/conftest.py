import os
import shutil
import sys
import tempfile

# A private compile cache per test session unless the caller chose one. This runs when
# pytest loads this file, before any test module imports moegen.
_OWN_CACHE = None
if not os.environ.get("MOEGEN_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="moegen-pytest-cache-")
    os.environ["MOEGEN_CACHE_DIR"] = _OWN_CACHE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile / dynamo tests (slower)")
    config.addinivalue_line("markers", "cli: cross-checks of the eager reference against the moegen CLI")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
