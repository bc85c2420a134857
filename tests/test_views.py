"""Report views (models/views.py): Figure 2, Tables 1-3 and Figure 4 as JSON, the HTML page,
the `robustact report` command, and the page rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from robustact.models.report import COLUMNS, ReportError, compare
from robustact.models.views import (amr_weights, build_views, defence_table, diagnostics, modal_table, nice_ticks, render_html,
                          robustness_curves, views_html, worst_case)
from robustact.service.cli import app
from tests.fixtures.make_paper_reports import PAPER_RI, TABLE2, paper_report
from tests.fixtures.make_view_reports import (EPS, fusion_report, unimodal_report, v2_report, v2_reports,
                                              view_reports)
from tests.fixtures.make_view_reports import write as write_view_reports


def paper_reports(dataset="ntu"):
    return [paper_report(*row, dataset=dataset) for row in TABLE2[dataset]]


# --------------------------------------------------------------------------- JSON views


@pytest.mark.parametrize("dataset", ["ntu", "imigue"])
def test_defence_table_is_the_papers_table_2(dataset):
    reports = paper_reports(dataset)
    table = defence_table(reports, baseline="None", attack="PGD20")
    assert [r["name"] for r in table["rows"]] == [row[0] for row in TABLE2[dataset]]
    assert table["skipped"] == [] and table["baseline"] == "None"
    for got, want in zip(table["rows"], compare(reports, baseline="None", attack="PGD20")["rows"]):
        assert got == {**want, "eps_used": 8.0}
    assert round(table["rows"][-1]["ri"], 2) == PAPER_RI[dataset][-1]
    # No baseline given: the row named None (these reports carry no model.defence).
    assert defence_table(reports[::-1])["baseline"] == "None"


def test_defence_table_skips_reports_without_the_attack_but_not_the_baseline():
    reports = view_reports()
    # Several budgets and none named: refused (an RI could mix 2/255 with 8/255).
    with pytest.raises(ReportError, match=r"several budgets \(2, 4, 6, 8 /255\)"):
        defence_table(reports, attack="PGD20")
    table = defence_table(reports, attack="PGD20", eps=2)
    assert table["baseline"] == "None"  # model.defence == "none", not the unimodal ones
    assert [r["name"] for r in table["rows"]] == ["None", "AT-RS", "AMR <3>"]
    assert [s["name"] for s in table["skipped"]] == ["Unimodal-rgb", "Unimodal-skeleton"]
    assert table["skipped"][0]["reason"] == "no PGD20 results (has none)"
    assert {r["eps_used"] for r in table["rows"]} == {2.0}
    at8 = defence_table(reports, attack="PGD20", eps=8)
    assert {r["eps_used"] for r in at8["rows"]} == {8.0}
    assert at8["rows"][2]["ri"] == pytest.approx(
        (at8["rows"][2]["clean"] + at8["rows"][2]["avg"]) - (at8["rows"][0]["clean"] + at8["rows"][0]["avg"]))
    with pytest.raises(ReportError, match="baseline 'Unimodal-rgb'"):
        defence_table(reports, baseline="Unimodal-rgb", eps=8)
    with pytest.raises(ReportError, match="not one of"):
        defence_table(reports, baseline="Nobody", eps=8)


def test_robustness_curves_have_one_point_per_budget_sorted():
    report = fusion_report(eps_list=(8, 2, 6, 4))  # written out of order
    view = robustness_curves([report])
    assert [p["attack"] for p in view["panels"]] == ["FGSM", "PGD20", "CW30"]
    for panel in view["panels"]:
        assert panel["clean"] == 88.09 and set(panel["series"]) == {"R", "S", "RS"}
        for mode, points in panel["series"].items():
            assert [p["eps"] for p in points] == [2.0, 4.0, 6.0, 8.0]
            entries = {round(a["eps_rgb"] * 255, 3): a for a in report["attacks"] if a["label"] == panel["attack"]}
            assert [p["accuracy"] for p in points] == [entries[e]["modes"][mode]["accuracy"] for e in (2, 4, 6, 8)]
        # The synthetic model is built like the paper's: ✗S degrades slowest.
        assert panel["series"]["S"][-1]["accuracy"] > panel["series"]["R"][-1]["accuracy"]


def test_robustness_curves_on_the_papers_reports_are_single_points():
    view = robustness_curves(paper_reports())
    assert len(view["panels"]) == 8
    amr = view["panels"][-1]
    assert amr["report"] == "AMR" and amr["clean"] == 81.65
    assert amr["series"] == {"R": [{"eps": 8.0, "accuracy": 68.54}], "S": [{"eps": 8.0, "accuracy": 80.40}],
                             "RS": [{"eps": 8.0, "accuracy": 66.52}]}


def test_modal_table_has_the_unimodal_baselines_of_the_same_dataset():
    reports = view_reports() + [unimodal_report("rgb", 40.0, dataset="other")]
    view = modal_table(reports, eps=6)
    assert view["columns"] == ["✓RS", "✗R", "✗S", "✗RS", "Avg", "Unimodal ✓R", "Unimodal ✓S"]
    assert [g["report"] for g in view["groups"]] == ["None", "AT-RS", "AMR <3>"]
    none = view["groups"][0]
    assert none["unimodal_R"] == 81.46 and none["unimodal_S"] == 81.46
    assert none["unimodal_reports"] == {"R": "Unimodal-rgb", "S": "Unimodal-skeleton"}
    assert [(r["attack"], r["eps"]) for r in none["rows"]] == [("FGSM", 6.0), ("PGD20", 6.0), ("CW30", 6.0)]
    row = none["rows"][1]
    assert row["avg"] == pytest.approx((row["R"] + row["S"] + row["RS"]) / 3) and row["clean"] == 88.09
    # Without eps every budget is a row; a fusion report of another dataset gets that dataset's baseline.
    assert len(modal_table(reports)["groups"][0]["rows"]) == 3 * len(EPS)
    other = modal_table([fusion_report(dataset="other"), *reports[3:]])["groups"][0]
    assert other["unimodal_R"] == 40.0 and other["unimodal_S"] is None


def test_modal_table_on_the_papers_reports_leaves_unimodal_empty():
    view = modal_table(paper_reports("imigue"))
    assert len(view["groups"]) == 8
    row = view["groups"][0]["rows"][0]
    assert (row["attack"], row["clean"], row["R"], row["S"], row["RS"]) == ("PGD20", 62.37, 0.11, 6.97, 0.07)
    assert row["unimodal_R"] is None and row["unimodal_S"] is None


def test_amr_weights_view():
    report = view_reports()[2]
    view = amr_weights(report)
    assert view["report"] == "AMR <3>" and [a["index"] for a in view["amrs"]] == [1, 2, 3]
    first = view["amrs"][0]
    assert len(first["channel_mean_rgb"]) == 32 and len(first["channel_mean_skel"]) == 24
    assert first["mean_rgb"] == pytest.approx(sum(first["channel_mean_rgb"]) / 32)
    # Means default to the mean of the channel means when a report leaves them out.
    del report["amr_weights"][0]["mean_skel"]
    assert amr_weights(report)["amrs"][0]["mean_skel"] == pytest.approx(sum(first["channel_mean_skel"]) / 24)
    assert amr_weights(paper_reports()[0])["amrs"] == []


def test_build_views_is_json_and_tolerates_a_missing_attack():
    views = build_views(view_reports())
    assert views["schema"] == "robustact.views/v1"
    assert json.loads(json.dumps(views)) == views
    assert [v["report"] for v in views["amr_weights"]] == ["AMR <3>"]
    only = build_views([paper_report("x", 50, 1, 2, 3, "ntu")], attack="CW30")
    assert "no CW30 results" in only["defence_table"]["error"]
    with pytest.raises(ReportError, match="at least one"):
        build_views([])


def test_nice_ticks():
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0, 8) == [0, 2, 4, 6, 8]
    ticks = nice_ticks(0.28, 0.35)
    assert ticks[0] <= 0.28 and ticks[-1] >= 0.35 and len(ticks) <= 8


# --------------------------------------------------------------------------- HTML


class _Page(HTMLParser):
    """Collects the tags, attributes and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def test_html_page_is_self_contained_and_escaped():
    page = render_html(view_reports(), title="Views <of> & reports")
    parsed = parse(page)
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "img" not in tags and "link" not in tags and "iframe" not in tags
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched
    assert "<title>Views &lt;of&gt; &amp; reports</title>" in page
    assert "AMR &lt;3&gt;" in page and "AMR <3>" not in page
    svgs = [a for t, a in parsed.tags if t == "svg"]
    figures = [a["data-figure"] for a in svgs]
    assert len(figures) == 3 * 3 + 3 and len(set(figures)) == len(figures)  # 9 curve panels, 3 AMRs
    assert all(a["width"] and a["height"] and a["viewbox"] for a in svgs)
    assert tags.count("polyline") == 9 * 3 + 3 * 2
    assert "Defence comparison (Table 2)" in page and "Unimodal ✓R" in page and "Mean value of W_R" in page


def test_html_page_of_the_papers_table_2():
    page = render_html(paper_reports(), baseline="None", attack="PGD20", title="Table 2")
    text = " ".join(parse(page).text)
    assert "60.69" in text and "71.82" in text  # AMR's RI and Avg
    assert "single points" in text and "No report holds AMR weights" in text


def test_cli_report_writes_html_and_json(tmp_path):
    paths = write_view_reports(tmp_path / "reports")
    runner = CliRunner()
    result = runner.invoke(app, ["report", *map(str, paths), "--out", str(tmp_path / "page.html"),
                                 "--json", str(tmp_path / "views.json"), "--attack", "CW30", "--eps", "8",
                                 "--title", "Synthetic"])
    assert result.exit_code == 0, result.output
    views = json.loads((tmp_path / "views.json").read_text())
    assert views["defence_table"]["attack"] == "CW30" and views["defence_table"]["baseline"] == "None"
    assert {r["eps_used"] for r in views["defence_table"]["rows"]} == {8.0}
    page = (tmp_path / "page.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>Synthetic</title>" in page
    result = runner.invoke(app, ["report", str(paths[0]), "--baseline", "Nobody", "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "not one of" in result.output


# --------------------------------------------------------------------------- v2 reports


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"no section {sid}"
    return match.group(1)


def table_head(html: str) -> list[str]:
    return re.findall(r"<th>(.*?)</th>", html.split("<tbody>", 1)[0])


def table_rows(html: str) -> list[list[str]]:
    """The cells' inner HTML of each body row of the first table in ``html``."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", body)]


def budget(report, eps):
    return next(w for w in report["worst_case"] if round(w["eps_rgb"] * 255, 3) == eps)


def attack_entry(report, label, eps):
    return next(a for a in report["attacks"] if a["label"] == label and round(a["eps_rgb"] * 255, 3) == eps)


def test_v2_fixture_is_built_like_an_evaluation():
    full, _, cascade, masked = v2_reports()
    assert full["schema"] == cascade["schema"] == "robustact.report/v2"
    assert (full["config"]["strategy"], cascade["config"]["strategy"]) == ("full", "worst-case")
    # The cascade attacks only the clips still standing, yet finds the same worst case and diagnostics.
    assert cascade["worst_case"] == full["worst_case"] and cascade["diagnostics"] == full["diagnostics"]
    pgd = attack_entry(cascade, "PGD20", 8)["modes"]["R"]
    assert pgd["accuracy"] is None and pgd["complete"] is False
    assert attack_entry(full, "PGD20", 8)["modes"]["R"]["complete"] is True
    assert full["diagnostics"]["flags"] == [] and masked["diagnostics"]["flags"]


def test_defence_table_has_the_worst_case_column():
    reports = v2_reports()[:2] + [fusion_report("v1", defence="at-rs")]
    for eps in (2, 8):
        table = defence_table(reports, attack="PGD20", eps=eps)
        assert table["columns"] == list(COLUMNS) and table["columns"][-1] == "WC" and table["skipped"] == []
        for row, report in zip(table["rows"], reports[:2]):
            assert row["wc"] == budget(report, eps)["overall"]["accuracy"]
            assert row["wc"] <= min(row["R"], row["S"], row["RS"])  # no attack does better than all of them
        assert table["rows"][2]["wc"] is None  # a v1 report has no worst case
    table = defence_table(reports, attack="PGD20", eps=8)
    html = section(render_html(reports, attack="PGD20", eps=8), "defence-table")
    assert table_head(html) == ["Defence", *COLUMNS]
    rows = table_rows(html)
    assert [len(r) for r in rows] == [1 + len(COLUMNS)] * 3
    assert [r[-1] for r in rows] == [f"{table['rows'][0]['wc']:.2f}", f"{table['rows'][1]['wc']:.2f}", "–"]
    assert [r[5] for r in rows] == [f"{row['avg']:.2f}" for row in table["rows"]]
    assert "WC: overall worst case" in html
    # The paper's v1 reports: the WC column is there and empty.
    paper = table_rows(section(render_html(paper_reports()), "defence-table"))
    assert {r[-1] for r in paper} == {"–"} and len(paper) == 8


def test_defence_table_lists_an_incomplete_cascade_under_skipped():
    full, _, cascade, _ = v2_reports()
    table = defence_table([full, cascade], attack="PGD20", eps=8)
    assert [r["name"] for r in table["rows"]] == ["None"]
    assert [s["name"] for s in table["skipped"]] == ["Cascade"]
    assert "worst-case cascade" in table["skipped"][0]["reason"] and "'worst-case'" in table["skipped"][0]["reason"]
    html = section(render_html([full, cascade], attack="PGD20", eps=8), "defence-table")
    assert "Left out" in html and escape(table["skipped"][0]["reason"]) in html
    with pytest.raises(ReportError, match="baseline 'Cascade'.*cascade"):
        defence_table([full, cascade], baseline="Cascade", attack="PGD20", eps=8)
    only = build_views([cascade], attack="PGD20", eps=8)
    assert "cascade" in only["defence_table"]["error"]
    assert "cascade" in section(views_html(only), "defence-table")
    # The worst-case columns of both: the cascade finds what the full run finds.
    worst = defence_table([full, cascade], attack="worst-case", eps=8)
    assert worst["skipped"] == [] and worst["attack"] == "worst-case"
    w8 = budget(cascade, 8)
    row = worst["rows"][1]
    assert (row["R"], row["S"], row["RS"], row["wc"], row["eps_used"]) == (
        w8["modes"]["R"]["accuracy"], w8["modes"]["S"]["accuracy"], w8["modes"]["RS"]["accuracy"],
        w8["overall"]["accuracy"], 8.0)
    assert worst["rows"][0] == {**row, "name": "None"} and row["ri"] == 0
    # Several budgets and no eps: compare's error; a v1 report has no worst case to show.
    with pytest.raises(ReportError, match="several budgets"):
        defence_table([full, cascade], attack="worst-case")
    mixed = defence_table([full, fusion_report("v1", defence="at-rs")], attack="worst-case", eps=8)
    assert mixed["skipped"] == [{"name": "v1", "reason": "no worst-case section at ε = 8/255"}]


def test_null_cells_render_as_dashes():
    cascade = v2_reports()[2]
    view = modal_table([cascade], eps=8)
    rows = {r["attack"]: r for r in view["groups"][0]["rows"]}
    fgsm = attack_entry(cascade, "FGSM", 8)["modes"]
    assert rows["FGSM"]["R"] == fgsm["R"]["accuracy"] and fgsm["R"]["complete"]  # the cascade's first link
    assert rows["FGSM"]["RS"] is None and rows["FGSM"]["avg"] is None
    assert all(rows["PGD20"][m] is None for m in ("R", "S", "RS", "avg"))
    html = section(render_html([cascade]), "modal-table")
    cells = {r[-8]: r[-7:] for r in table_rows(html)}  # attack label → ✓RS … Unimodal ✓S
    assert cells["PGD20 ε=8/255"] == ["90.00", "–", "–", "–", "–", "–", "–"]
    assert cells["FGSM ε=8/255"][:5] == ["90.00", f"{fgsm['R']['accuracy']:.2f}", f"{fgsm['S']['accuracy']:.2f}",
                                         "–", "–"]
    assert "column is incomplete" in html
    # Figure 2 draws only what is known: no panel of an attack without any complete column.
    panels = robustness_curves([cascade])["panels"]
    assert "Square100" not in [p["attack"] for p in panels]
    assert all(p["accuracy"] is not None for panel in panels for pts in panel["series"].values() for p in pts)


def test_worst_case_view_and_section():
    reports = v2_reports() + [fusion_report("v1"), v2_report("RGB+skeleton only", modes=("R", "S"))]
    view = build_views(reports)["worst_case"]
    assert view == worst_case(reports)
    assert [g["report"] for g in view["groups"]] == ["None", "AT-RS", "Cascade", "Masked <m>", "RGB+skeleton only"]
    assert view["without"] == ["v1"]
    for group, report in zip(view["groups"][:4], reports):
        assert group["strategy"] == report["config"]["strategy"] and group["clean"] == 90.0
        assert [r["eps"] for r in group["rows"]] == [2.0, 8.0]
        for row in group["rows"]:
            w = budget(report, row["eps"])
            assert row["attacks"] == w["attacks"] == ["FGSM", "PGD20", "Square100"]
            assert [row[m] for m in ("R", "S", "RS")] == [w["modes"][m]["accuracy"] for m in ("R", "S", "RS")]
            assert row["overall"] == w["overall"]["accuracy"] and row["avg"] == pytest.approx(w["avg"])
            assert row["RS"] <= min(row["R"], row["S"]) and row["overall"] <= row["RS"]
    # ✗RS counts R-only and S-only breaks: below every single RS attack of the budget here.
    none8 = view["groups"][0]["rows"][1]
    assert none8["RS"] < min(attack_entry(reports[0], label, 8)["modes"]["RS"]["accuracy"]
                             for label in ("FGSM", "PGD20", "Square100"))
    assert view["groups"][2]["rows"] == view["groups"][0]["rows"]  # cascade = full
    partial = view["groups"][-1]["rows"][0]
    assert partial["RS"] is None and partial["avg"] is None and partial["overall"] is not None

    html = section(render_html(reports), "worst-case")
    assert table_head(html) == ["Model", "ε (×1/255)", "✓RS", "✗R", "✗S", "✗RS", "Avg", "Overall", "Attacks"]
    rows = table_rows(html)
    assert len(rows) == 2 * 5
    assert rows[1] == ["8", "90.00", *(f"{none8[k]:.2f}" for k in ("R", "S", "RS", "avg", "overall")),
                       "FGSM, PGD20, Square100"]
    assert rows[-2][0] == "RGB+skeleton only" and rows[-2][5:7] == ["–", "–"]
    assert "Cascade (worst-case cascade)" in html and "Masked &lt;m&gt;" in html
    assert "No worst case (v1 reports): v1" in html
    assert "No report has a worst-case section" in section(render_html(view_reports()), "worst-case")


def test_diagnostics_banner_appears_iff_a_flag_is_raised():
    quiet = v2_reports()[:3]
    assert all(r["diagnostics"]["flags"] == [] for r in quiet)
    for page in (render_html(quiet), render_html(view_reports()), render_html(paper_reports())):
        assert "diagnostics-warning" not in page and 'class="banner"' not in page
    masked = v2_reports()[3]
    masked["diagnostics"]["flags"].append({"check": "custom<x>", "message": "<script>alert(1)</script> & co"})
    page = render_html([quiet[0], masked])
    assert "script" not in [t for t, _ in parse(page).tags] and "<script>" not in page
    banner = re.search(r'<div class="banner" id="diagnostics-warning" role="alert">(.*?)</div>', page, re.S).group(1)
    assert page.index('id="diagnostics-warning"') < page.index("<section")  # at the top of the page
    items = re.findall(r"<li>(.*?)</li>", banner)
    assert items == [f"<strong>Masked &lt;m&gt;</strong> [{escape(f['check'])}]: {escape(f['message'])}"
                     for f in masked["diagnostics"]["flags"]]
    assert {"zero_gradient", "unbounded", "black_box"} < {f["check"] for f in masked["diagnostics"]["flags"]}
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in banner and "1 report(s)" in banner
    assert '<a href="#diagnostics">' in banner


def test_diagnostics_section_summarises_each_report():
    reports = [v2_reports()[0], v2_reports()[3], fusion_report("v1")]
    d = reports[1]["diagnostics"]
    d["monotonic_steps"] = [{"mode": "R", "from": {"steps": 1, "attack": "FGSM", "accuracy": 50.0},
                             "to": {"steps": 20, "attack": "PGD20", "accuracy": 60.0}}]
    d["flags"].append({"check": "monotonic_steps", "message": "✗R: PGD20 (60.00%) is weaker than FGSM (50.00%)"})
    view = diagnostics(reports)
    assert view == build_views(reports)["diagnostics"] and view["without"] == ["v1"]
    assert [f["report"] for f in view["flags"]] == ["Masked <m>"] * len(d["flags"])
    none, masked = view["rows"]
    assert none["flags"] == 0 and none["checks_flagged"] == [] and none["unbounded"] == 0.0
    assert none["black_box_clips"] == 0 and none["black_box_cells"] == 6 and none["zero_gradient_rgb"] == 0.0
    assert masked["flags"] == len(d["flags"])
    assert masked["checks_flagged"] == ["black_box", "monotonic_steps", "unbounded", "zero_gradient"]
    assert masked["zero_gradient_rgb"] == d["zero_gradient"]["rgb"] > 0
    assert masked["unbounded"] == d["unbounded"]["accuracy"] > d["unbounded"]["threshold"]
    assert masked["black_box_clips"] == max(b["clips"] for b in d["black_box"]) > 0
    assert (masked["monotonic_eps"], masked["monotonic_steps"], masked["unstable_clips"], masked["probabilities"]) \
        == (0, 1, 0, False)

    html = section(render_html(reports), "diagnostics")
    rows = table_rows(html)
    assert [r[0] for r in rows] == ["None", "Masked &lt;m&gt;"]
    assert rows[1][1:] == [str(len(d["flags"])), f"{masked['zero_gradient_rgb']:.1f}", "0.0",
                           f"{masked['unbounded']:.2f}", f"{masked['black_box_clips']} ({masked['black_box_percent']:.2f}%)",
                           "0", "1", "0", "no"]
    shaded = re.findall(r'<td class="flagged">(.*?)</td>', html)
    assert shaded == [rows[1][i] for i in (1, 2, 4, 5, 7)]  # flags, zero RGB, unbounded, Square-only, steps
    assert "No diagnostics (v1 reports): v1" in html
    assert "No report holds diagnostics" in section(render_html(view_reports()), "diagnostics")


def test_views_of_v2_reports_are_json_and_pages_without_the_new_views_still_render():
    views = build_views(v2_reports() + view_reports())
    assert json.loads(json.dumps(views)) == views
    # A document assembled by hand (as models.reproduce does) has no worst case or diagnostics.
    legacy = {k: v for k, v in views.items() if k not in ("worst_case", "diagnostics")}
    page = views_html(legacy)
    assert "No report has a worst-case section" in page and "diagnostics-warning" not in page


def test_cli_report_of_v2_reports(tmp_path):
    paths = write_view_reports(tmp_path / "reports", v2_reports())
    result = CliRunner().invoke(app, ["report", *map(str, paths), "--out", str(tmp_path / "page.html"),
                                      "--json", str(tmp_path / "views.json"), "--attack", "worst-case", "--eps", "8"])
    assert result.exit_code == 0, result.output
    views = json.loads((tmp_path / "views.json").read_text())
    table = views["defence_table"]
    assert [r["name"] for r in table["rows"]] == ["None", "AT-RS", "Cascade", "Masked <m>"]
    assert [r["wc"] for r in table["rows"]] == [budget(r, 8)["overall"]["accuracy"] for r in v2_reports()]
    page = (tmp_path / "page.html").read_text()
    assert 'id="diagnostics-warning"' in page and 'id="worst-case"' in page


# --------------------------------------------------------------------------- Chromium


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs the Debian packages chromium and chromium-driver (make sysdeps)")
    pytest.importorskip("selenium")
    return browser, driver


def _png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of raw pixels."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data, width = 8, b"", 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 4 if colour == 6 else 3
        elif kind == b"IDAT":
            data += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(data), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


@pytest.mark.integration
def test_html_page_renders_in_headless_chromium(tmp_path):
    """Loads the page in headless Chromium (selenium + chromedriver) and checks that every
    figure is laid out with a non-zero box, draws its lines, and that a screenshot of a
    figure is not blank (the ✗R series' red is on it)."""
    browser, driver = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = tmp_path / "report.html"
    page.write_text(render_html(view_reports() + paper_reports()[:1], title="Rendered"), encoding="utf-8")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver,
                                                               log_output=str(tmp_path / "chromedriver.log")))
    try:
        chrome.get(page.as_uri())
        assert chrome.title == "Rendered"
        figures = chrome.execute_script("""
            return Array.from(document.querySelectorAll('svg[data-figure]')).map(svg => {
              const box = svg.getBoundingClientRect();
              const lines = Array.from(svg.querySelectorAll('polyline.series, path, line.reference'))
                .filter(e => e.tagName !== 'polyline' || e.points.numberOfItems > 1);
              return {figure: svg.dataset.figure, width: box.width, height: box.height,
                      title: svg.querySelector(':scope > title') ? svg.querySelector(':scope > title').textContent : null,
                      polylines: svg.querySelectorAll('polyline.series').length,
                      paths: svg.querySelectorAll('path').length,
                      drawn: lines.map(e => { const b = e.getBBox(); return b.width + b.height; }),
                      circles: svg.querySelectorAll('circle').length};
            });""")
        assert len(figures) == 9 + 1 + 3, [f["figure"] for f in figures]  # curves, the paper's None (PGD20), AMRs
        for fig in figures:
            assert fig["width"] > 100 and fig["height"] > 100, fig
            assert fig["title"] and fig["paths"] >= 1 and fig["polylines"] >= 1, fig
            assert all(size > 0 for size in fig["drawn"]), fig
            assert fig["circles"] >= 1, fig
        curves = [f for f in figures if f["figure"].startswith("curves-")]
        assert all(f["polylines"] == 3 for f in curves)
        assert "AMR <3> — PGD20" in [f["title"] for f in figures]  # escaped in the source, shown as text

        svg = chrome.find_element("css selector", 'svg[data-figure="curves-1"]')
        width, bpp, rows = _png_pixels(svg.screenshot_as_png)
        pixels = {row[i:i + 3] for row in rows for i in range(0, len(row), bpp)}
        assert len(pixels) > 20, "the figure's screenshot is blank"
        red = [p for p in pixels if p[0] > 180 and p[1] < 90 and p[2] < 90]
        assert red, "no ✗R line (red) in the figure's screenshot"
        page_png = chrome.get_screenshot_as_png()
        (tmp_path / "page.png").write_bytes(page_png)
        assert len({r for r in _png_pixels(page_png)[2]}) > 50
    finally:
        chrome.quit()
