"""Reports: ratios to the baseline, skip records listed, rebuilt byte-identically from results.json."""
import json

import pytest

from benchmarks.report import rebuild, write_report


def _lat(ms):
    return {"median_ms": ms, "p90_ms": ms * 1.1, "min_ms": ms * 0.9, "max_ms": ms * 1.2, "mean_ms": ms, "n": 5}


def _record(label, ppl, prefill, tok_s, size, params, base=False, backend="torch-cpu"):
    return {"label": label, "target": f"runs/x/{label}", "kind": "torch", "task": "causal-lm", "backend": backend,
            "key": label, "is_baseline": base, "threads": 2, "params": params, "size_bytes": size,
            "settings": {"data": {"source": "builtin:wikipedia", "split": "test", "max_tokens": 4096}, "window": 256,
                         "stride": 256, "kl_top_k": 64, "threads": 2, "latency": {
                             "batch": 1, "prompt_tokens": 128, "new_tokens": 32, "seq_tokens": 128,
                             "throughput_batch": 16, "warmup": 2, "repeats": 5}},
            "quality": {"perplexity": ppl, "top1_agreement": 1.0 if base else 0.8, "kl": 0.0 if base else 0.3},
            "latency": {"prefill": _lat(prefill), "decode": _lat(320.0), "decode_tokens_per_s": tok_s,
                        "decode_ms_per_token": 1000 / tok_s},
            "memory": {"peak_rss_mb": 900.0 if base else 600.0},
            "machine": {"cpu": "Test CPU", "cpu_flags": ["AVX2"], "cores": 2, "usable_cores": 2, "versions": {"torch": "x"},
                        "git_commit": "abc"},
            "loadavg_before": [0.1, 0.2, 0.3], "loadavg_after": [0.2, 0.2, 0.3], "measured_at": "2026-01-01T00:00:00Z"}


def _records():
    return [
        _record("source", 20.0, 250.0, 24.0, 540_000_000, 134_500_000, base=True),
        _record("01-quantize", 20.5, 100.0, 30.0, 270_000_000, 134_500_000),
        {"label": "01-quantize", "backend": "torch-cuda", "task": "causal-lm", "key": "q",
         "skipped": "torch-cuda: CUDA is not available on this machine"},
    ]


def test_report_has_ratios_to_the_source_and_lists_skips(tmp_path):
    path = write_report(_records(), tmp_path, "demo", command="compress run demo.yaml")
    md = path.read_text()
    assert "compress run demo.yaml" in md
    row = next(line for line in md.splitlines() if line.startswith("| 01-quantize | torch-cpu"))
    assert "20.500 (1.02x)" in row and "270.0 (0.50x)" in row and "100.0 (0.40x)" in row and "30.0 (1.25x)" in row
    assert "01-quantize on torch-cuda: torch-cuda: CUDA is not available" in md
    assert "1.33" in md  # max/min spread of the timings (1.2 / 0.9)
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # plots embedded: self-contained
    assert (tmp_path / "causal-lm-quality-vs-latency.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["records"][2]["skipped"]


def test_report_is_rebuilt_byte_identically_from_results_json(tmp_path):
    write_report(_records(), tmp_path, "demo", command="compress bench a b")
    names = ["results.json", "report.md", "report.html", "causal-lm-quality-vs-latency.png",
             "causal-lm-quality-vs-size.png"]
    before = {n: (tmp_path / n).read_bytes() for n in names}
    for n in names[1:]:
        (tmp_path / n).unlink()
    from pipelines.cli import main

    assert main(["report", str(tmp_path)]) == 0
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    rebuild(tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in names} == before


def test_report_of_a_directory_without_results_is_bad_input(tmp_path):
    from pipelines.cli import main

    assert main(["report", str(tmp_path)]) == 2


def test_report_compares_every_row_with_the_baseline_across_backends(tmp_path):
    ort = _record("01-quantize", 22.0, 80.0, 48.0, 135_000_000, 134_500_000, backend="ort-cpu")
    md = write_report(_records()[:2] + [ort], tmp_path, "demo").read_text()
    section = md.split("Against the baseline `source` on torch-cpu", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| 01-quantize | ort-cpu"))
    assert row == "| 01-quantize | ort-cpu | 4.00x | 1.100x | 2.00x |"  # 540/135 MB, 22/20 ppl, 48/24 tok/s
    single = write_report(_records(), tmp_path / "one", "demo").read_text()
    assert "Against the baseline" not in single  # one backend: the main table already says it


def test_a_report_into_an_earlier_ones_folder_leaves_no_stale_plots(tmp_path):
    """Re-running into the same --output folder kept the earlier run's plots when this run had nothing to plot
    (every row failed): the folder then held a quality-vs-latency plot of rows its report does not have."""
    write_report(_records(), tmp_path, "first")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["causal-lm-quality-vs-latency.png",
                                                               "causal-lm-quality-vs-size.png"]
    failed = {"label": "source", "backend": "torch-cpu", "task": "causal-lm", "key": "s", "is_baseline": True,
              "error": "the measurement took longer than timeout_s=2 s"}
    md = write_report([failed], tmp_path, "second").read_text()
    assert list(tmp_path.glob("*.png")) == [] and ".png" not in md
    assert "source on torch-cpu: error: the measurement took longer than timeout_s=2 s" in md
    assert [r["label"] for r in json.loads((tmp_path / "results.json").read_text())["records"]] == ["source"]


def test_ratios_to_a_baseline_on_another_backend_are_said_so(tmp_path):
    """With no baseline row on ort-cpu (its export skipped or failed, or a GGUF on llamacpp-cpu) the ORT rows'
    bracketed ratios were to the torch-cpu baseline, under a line saying they are "on the same backend"."""
    ort = _record("01-quantize", 22.0, 80.0, 48.0, 135_000_000, 134_500_000, backend="ort-cpu")
    md = write_report(_records()[:2] + [ort], tmp_path, "demo").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 01-quantize | ort-cpu"))
    assert "135.0 (0.25x)" in row  # 135 MB against the torch baseline's 540 MB
    assert "No baseline row on ort-cpu: the ratios in brackets of its rows are to the baseline on torch-cpu." in md
    assert "No baseline row on torch-cpu" not in md
    base_ort = _record("source", 20.0, 50.0, 40.0, 270_000_000, 134_500_000, base=True, backend="ort-cpu")
    md = write_report(_records()[:2] + [base_ort, ort], tmp_path / "both", "demo").read_text()
    assert "No baseline row" not in md


def test_bandwidth_bound_counts_decode_steps_not_tokens_of_a_batch(tmp_path):
    """At batch 4 each decode step reads the weights once for 4 tokens: the column showed 4x the share of the
    bound (tokens/s against a bound on steps/s), e.g. 96% where the decoder reached 24%."""
    rows = []
    for batch in (1, 4):
        r = _record(f"b{batch}", 20.0, 250.0, 24.0 * batch, 540_000_000, 134_500_000, base=batch == 1)
        r["latency"]["batch"] = batch
        r["weight_bytes_per_token"] = 100_000_000
        r["machine"]["memory_bandwidth_gb_s"] = 10.0  # bound: 100 steps/s
        rows.append(r)
    md = write_report(rows, tmp_path, "demo").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| checkpoint"))
    col = head.split(" | ").index("% of bandwidth bound")
    rows = [line for line in md.splitlines() if line.startswith(("| b1 ", "| b4 "))][:2]  # the results table
    assert [line.split(" | ")[col] for line in rows] == ["24", "24"]


def test_a_crashed_rows_reason_is_in_the_report(tmp_path):
    """The "Not measured" list kept the first line of an error only: a crashed worker's row read "error: the
    measuring process exited with code 1:", its reason (the last line of its stderr) left out."""
    crashed = {"label": "01-quantize", "backend": "ort-cpu", "task": "causal-lm", "key": "q",
               "error": "the measuring process exited with code 1:\n  File \"x.py\", line 3\n"
                        "MemoryError: std::bad_alloc\n"}
    md = write_report(_records()[:1] + [crashed], tmp_path, "demo").read_text()
    assert ("- 01-quantize on ort-cpu: error: the measuring process exited with code 1: ... MemoryError: "
            "std::bad_alloc") in md
    one_line = {**crashed, "error": "ValueError: bad"}
    assert "- 01-quantize on ort-cpu: error: ValueError: bad\n" in write_report(
        _records()[:1] + [one_line], tmp_path / "b", "demo").read_text()


@pytest.mark.parametrize("record, message", [
    ({}, "record 1 has no label, backend, task"), (3, "record 1 has no label, backend, task"),
    ({"label": "x", "backend": "torch-cpu", "task": "causal"}, "record 1 has an unknown task 'causal'")])
def test_report_names_a_damaged_record_instead_of_a_traceback(tmp_path, capsys, record, message):
    from pipelines.cli import main

    (tmp_path / "results.json").write_text(json.dumps({"records": [_records()[0], record]}))
    assert main(["report", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("content", [b"{bad", b"\xff\xfe\x00", b"[" * 100_000 + b"]" * 100_000],
                         ids=["not JSON", "not UTF-8", "nested too deeply"])
def test_report_of_a_damaged_results_file_is_one_line(tmp_path, capsys, content):
    """A results.json that is not UTF-8 was a UnicodeDecodeError traceback (invalid JSON was handled)."""
    from pipelines.cli import main

    (tmp_path / "results.json").write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'results.json'} is not valid JSON" in err and "Traceback" not in err, err
    assert not (tmp_path / "report.md").exists()


def test_report_lists_each_rows_notes(tmp_path):
    """A row's notes (teacher-agreement not computed, a failed timing round) were kept in results.json only."""
    records = _records()
    records[1]["notes"] = ["teacher-agreement skipped: the baseline tokenizes the eval data differently"]
    md = write_report(records, tmp_path, "demo").read_text()
    notes = md.split("## Notes", 1)[1].split("##", 1)[0]
    assert "- 01-quantize on torch-cpu: teacher-agreement skipped: the baseline tokenizes the eval data " \
           "differently" in notes
    assert "Notes" in (tmp_path / "report.html").read_text()


def test_report_takes_the_results_file_itself(tmp_path, capsys):
    """`compress report DIR/results.json` said "DIR/results.json has no results.json" (exit 2)."""
    from pipelines.cli import main

    write_report(_records(), tmp_path, "demo")
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# demo")
    assert f"report rebuilt: {tmp_path / 'report.md'} and {tmp_path / 'report.html'}" in capsys.readouterr().out
