"""The documentation stays true: every `$ cnnlab` command in the README and the guides runs (training ones with
--dry-run), the site builds offline with --strict and opens with every other host blocked, the CLI reference
lists every command and flag `cnnlab --help` knows, the benchmarks page shows every result file, and the
README's figures are the result files'."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cnnlab import cli, models
from cnnlab.models import pretrained
from conftest import ARTIFACTS, launch_chromium, needs_chromium, write_image_folder
from conftest import CLASSES as CIFAR_CLASSES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import docgen  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def guides() -> list[Path]:
    """The README, then every page of the site in the order of its navigation."""
    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md"] + [ROOT / "docs" / p for p in pages(nav) if (ROOT / "docs" / p).is_file()]


def test_every_example_command_runs(tmp_path, monkeypatch, capsys):
    """Run where a user stands: "CIFAR-10" found through $CNNLAB_DATA (here 10 classes of small generated
    images a model learns in one epoch, so a dry run's model is good enough for `--min-confidence auto`), a
    folder `photos/` of photo-sized JPEGs, `cat.jpg`, and ImageNet weights in the hub cache (random: nothing
    is downloaded). Each distinct command runs once, in the order a reader meets it; `train` and `serve` get
    --dry-run, `doctor` --seconds 0.1."""
    commands = list(dict.fromkeys(command for _, command in docgen.example_commands(guides())))
    assert len(commands) >= 25 and all(c.startswith("cnnlab ") for c in commands)
    work = tmp_path / "work"
    cifar = write_image_folder(tmp_path / "cifar10", classes=CIFAR_CLASSES, per_class=24, size=(32, 32))
    write_image_folder(work / "photos", classes=("bird", "cat", "dog", "frog"), per_class=6, size=(100, 120),
                       test=False, ext=".jpg")
    Image.open(next((cifar / "test" / "cat").iterdir())).save(work / "cat.jpg")
    monkeypatch.setenv("CNNLAB_DATA", str(cifar))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = pretrained.cached_path(pretrained.IMAGENET["mobilenet_v3_large"])  # the finetune preset's network
    cached.parent.mkdir(parents=True)
    torch.save(models.build("mobilenet_v3_large", 3, 1000, (224, 224)).state_dict(), cached)
    monkeypatch.chdir(work)
    seconds = {}
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] in ("train", "serve") and "--resume" not in argv and "--dry-run" not in argv:
            argv.append("--dry-run")
        if argv == ["doctor"]:  # its smoke setting: each step timed for 0.1 s, not 1 s
            argv += ["--seconds", "0.1"]
        t0 = time.monotonic()
        code = cli.main(argv)
        seconds[command] = round(time.monotonic() - t0, 1)
        out = capsys.readouterr()
        assert code in (0, None), f"{command}: exit {code}\n{out.err[-2000:]}"
        if command == "cnnlab export runs/quick --int8":  # after `cnnlab export runs/quick`: its graph, reused
            assert "from the run's fp32 export of these weights" in out.out
    print(json.dumps(seconds, indent=1))  # pytest -s: where this test's time goes
    assert (work / "runs" / "budget" / "trials.csv").is_file() and (work / "runs" / "quick" / "model.onnx").is_file()


def test_the_cli_reference_lists_every_command_and_flag(capsys):
    reference = docgen.cli_reference()
    commands = re.findall(r"^    (\w[\w-]*) ", _help([], capsys), re.M)
    assert {"train", "serve", "data", "explain", "predict"} <= set(commands)
    checked = 0
    for command in [[c] for c in commands if c != "data"] + [["data", "info"], ["data", "check"]]:
        text = _help(command, capsys)
        section = reference.split(f"## `cnnlab {' '.join(command)}`\n", 1)[1].split("\n## ", 1)[0]
        flags = set(re.findall(r"^  (?:-\w, )?(--[a-z][\w-]*)", text, re.M)) - {"--help"}  # the options' lines
        assert all(f"`{f}`" in section for f in flags), (command, [f for f in flags if f"`{f}`" not in section])
        checked += len(flags)
    assert checked > 100  # train alone has more than 60


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return capsys.readouterr().out


def test_the_benchmarks_page_is_generated_from_every_result_file(tmp_path):
    page = docgen.benchmarks_page()
    for path in RESULTS.glob("*.json"):
        assert f"`{path.name}`" in page
    results = tmp_path / "results"
    results.mkdir()
    (results / "budget-newcpu.json").write_text(json.dumps({
        "machine": {"cpu_class": "avx2", "cpu": "Some CPU", "cores": 2, "date": "2030-01-01 00:00"},
        "command": "python benchmarks/budget.py --minutes 2", "rows": [{"data": "photos", "test_accuracy": 61.25}]}))
    page = docgen.benchmarks_page(results)
    assert "## budget" in page and "**avx2**" in page and "2030-01-01 00:00" in page and "| photos | 61.25 |" in page


def test_the_readme_is_short_and_its_figures_are_the_result_files():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 150 and lines[2].split()[:2] == ["make", "demo"] and lines[3].split()[:2] == ["make", "test"]
    for page in ("photos", "transfer", "training", "budget", "report", "deploy", "scale-out", "reliability"):
        assert f"(docs/{page}.md)" in readme
    rows = [r for r in lines[lines.index("## Measured"):] if r.startswith("| ") and r.endswith("` |")]
    assert len(rows) >= 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        leaves = list(_numbers(json.loads((RESULTS / cells[-1].strip("`")).read_text())))
        for figure in re.findall(r"\d[\d,]*\.?\d*", cells[1]):
            value, decimals = float(figure.replace(",", "")), len(figure.partition(".")[2])
            if decimals == 0 and value < 10:
                continue  # counts in prose ("2 rounds"), not figures
            assert any(math.isclose(round(v, decimals), value) for v in leaves), (figure, cells[-1])


def _numbers(value):
    if isinstance(value, dict | list):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield from (abs(value), abs(value) * 100)  # (a sign is said in words: "0.32 points ahead")


@needs_chromium
def test_the_site_builds_offline_and_opens_with_every_other_host_blocked(tmp_path):
    from playwright.sync_api import sync_playwright

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "cnnlab train" in (site / "cli.html").read_text() and "budget-" in (site / "benchmarks.html").read_text()
    outside = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                   else (outside.append(route.request.url), route.abort()))
        page.goto((site / "getting-started.html").as_uri())
        assert "A five-minute tour" in page.inner_text("article")
        page.get_by_role("link", name="Command line").first.click()
        page.wait_for_url("**/cli.html")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "docs-cli.png"))
        assert page.locator("h2#cnnlab-train").count() == 1
        browser.close()
    assert outside == []
