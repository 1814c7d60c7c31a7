"""The console's HTTP side, without a browser: what `/ui` and its assets are served with.

The browser drives the page in `test_console_browser.py`; here every answer of the console is
checked for its security and cache headers, against a real `timerd api`.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.console import CONTENT_SECURITY_POLICY
from tests.support.nginx import NGINX_MISSING, UPSTREAM_HEADER, Nginx, nginx_binary
from tests.support.procs import HOST, TimerdProcess, TimerdProcesses

ASSETS = ["console.js", "console.css", "favicon.svg"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TimerdProcess]:
    path = tmp_path_factory.mktemp("console")
    with TimerdProcesses(path) as procs:
        yield procs.start("api", f"sqlite:///{path / 'timerd.db'}", env={"TIMERD_AUTH": "keys"})


@pytest.mark.parametrize("path", ["/ui", *(f"/ui/static/{name}" for name in ASSETS)])
def test_every_console_answer_is_locked_down_and_revalidated(api: TimerdProcess, path: str) -> None:
    answer = httpx.get(api.base_url + path)  # no key: the console holds no data
    assert answer.status_code == 200, answer.text
    csp = answer.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == directives["style-src"] == "'self'"  # nothing inline
    assert directives["frame-ancestors"] == "'none'"
    assert "http" not in csp  # no remote origin
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-cache"
    again = httpx.get(api.base_url + path, headers={"if-none-match": answer.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["content-security-policy"] == csp


def test_the_page_loads_only_its_own_files_and_no_inline_code(api: TimerdProcess) -> None:
    page = httpx.get(api.base_url + "/ui").text
    assert '<script src="ui/static/console.js" defer></script>' in page
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    assert not re.search(r"\son[a-z]+\s*=", page)  # no inline event handler attributes
    script = httpx.get(api.base_url + "/ui/static/console.js").text
    markup = r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc"
    assert not re.search(markup, script)  # nothing that parses text as markup or code


def test_an_unknown_asset_is_a_json_404(api: TimerdProcess) -> None:
    for path in ["/ui/static/nope.js", "/ui/static/..%2Fapp.py", "/ui/static/index.htm"]:
        answer = httpx.get(api.base_url + path)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "not_found"


def test_every_asset_is_package_data() -> None:
    """An installed (not editable) timerd carries the console: pyproject.toml names its files."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api.console"]
    static = ROOT / "api" / "console" / "static"
    files = sorted(p.relative_to(static.parent).as_posix() for p in static.iterdir())
    assert {"static/index.html", *(f"static/{name}" for name in ASSETS)} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_behind_nginx_every_replica_serves_the_console_with_the_same_etags(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    if nginx_binary() is None:
        pytest.skip(NGINX_MISSING)
    store = f"sqlite:///{tmp_path / 'timerd.db'}"
    apis = [procs.start("api", store, ready=False) for _ in range(2)]
    for api in apis:
        api.wait_ready()
    replicas = {f"{HOST}:{api.port}" for api in apis}
    with Nginx(tmp_path, sorted(replicas)) as lb:
        for path in ["/ui", "/ui/static/console.js", "/stats"]:
            answers = [httpx.get(lb.base_url + path) for _ in range(4)]  # round robin: both
            assert {a.headers[UPSTREAM_HEADER] for a in answers} == replicas
            assert {a.status_code for a in answers} == {200}
            if path != "/stats":
                assert len({a.headers["etag"] for a in answers}) == 1  # revalidates anywhere
                assert {a.headers["content-security-policy"] for a in answers} == {
                    CONTENT_SECURITY_POLICY
                }
