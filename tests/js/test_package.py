"""The JavaScript client as a package: one source, its build, its types, its tarball."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from tests.js.conftest import PACKAGE, node_bin, run
from tests.support import ROOT


def test_served_tidings_js_is_the_build_of_the_package(node: str) -> None:
    done = run([node, "scripts/build.mjs", "--check"])
    assert done.returncode == 0, done.stdout + done.stderr
    served = (ROOT / "webapp" / "static" / "tidings.js").read_text()
    assert "GENERATED from clients/js/src" in served


def test_unit_tests_of_the_package(node: str) -> None:
    done = run([node, "--test", "test/unit/"])
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout


def test_typed_usage_type_checks(node: str) -> None:
    """tsc --noEmit over test/types: the declarations, used as a front end would (strict)."""
    done = run([str(node_bin("tsc")), "--noEmit", "-p", "test/types"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_npm_pack_offline_then_install_and_import(node: str, tmp_path: Path) -> None:
    packed = run(["npm", "pack", "--offline", "--json", "--pack-destination", str(tmp_path)])
    assert packed.returncode == 0, packed.stdout + packed.stderr
    tarball = tmp_path / json.loads(packed.stdout)[0]["filename"]
    with tarfile.open(tarball) as archive:
        names = {name.removeprefix("package/") for name in archive.getnames()}
        browser = archive.extractfile("package/dist/tidings.js").read().decode()
    for needed in ("package.json", "README.md", "LICENSE", "src/index.js", "src/client.js"):
        assert needed in names, sorted(names)
    assert {"types/index.d.ts", "types/global.d.ts", "dist/tidings.js"} <= names
    assert not [name for name in names if name.startswith(("test/", "node_modules/"))]
    assert browser == (ROOT / "webapp" / "static" / "tidings.js").read_text()

    # A project of a front-end team: install the tarball, import it, use its types.
    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    installed = run(
        ["npm", "install", "--prefer-offline", "--no-audit", "--no-fund", str(tarball)],
        cwd=project,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    script = (
        "import Tidings, { TidingsError } from 'tidings-client';"
        "console.log(typeof Tidings, Tidings.name, typeof TidingsError,"
        " Tidings.compareOffsets('9-0', '10-0'))"
    )
    imported = run([node, "--input-type=module", "-e", script], cwd=project)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == ["function", "Tidings", "function", "-1"]
    (project / "page.ts").write_text(
        '/// <reference types="tidings-client/global" />\n'
        "import { Tidings } from 'tidings-client';\n"
        "const a: Tidings = new window.Tidings({ transport: 'sse' });\n"
        "a.subscribe('orders.1', (pubs) => pubs.forEach((p) => p.offset.length));\n"
    )
    checked = run(
        [
            str(node_bin("tsc")),
            "--noEmit",
            "--strict",
            "--module",
            "node16",
            "--lib",
            "es2020,dom",
            "page.ts",
        ],
        cwd=project,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_package_metadata() -> None:
    meta = json.loads((PACKAGE / "package.json").read_text())
    assert (meta["name"], meta["version"], meta["license"]) == ("tidings-client", "0.1.0", "MIT")
    assert "socket.io-client" in meta["dependencies"]
    assert "typescript" in meta["devDependencies"]
    # npm pack must work offline: its one hook is the build, plain Node.
    assert meta["scripts"]["prepack"] == "node scripts/build.mjs --dist-only"
    assert (PACKAGE / "package-lock.json").exists()
