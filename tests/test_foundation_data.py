import json

import pytest
import torch

from compress.data import SPLITS, DataSpec, PipelineData, lm_windows, load_dataset, text_batches
from compress.errors import DataSourceError
from tiny_models import tiny_tokenizer


@pytest.mark.parametrize("source", ["builtin:shakespeare", "builtin:wikipedia", "builtin:bbc-news"])
def test_builtin_splits_are_disjoint_complete_and_deterministic(source):
    parts = {s: load_dataset(DataSpec(source=source, split=s)) for s in SPLITS}
    ids = {s: set(d.ids) for s, d in parts.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert all(len(v) > 0 for v in ids.values())
    texts = {s: set(d.texts) for s, d in parts.items()}
    assert not texts["train"] & texts["test"], "the same text is in train and test"
    again = load_dataset(DataSpec(source=source, split="test"))
    assert again.ids == parts["test"].ids and again.texts == parts["test"].texts
    # a different read order, the same documents
    reordered = load_dataset(DataSpec(source=source, split="test", seed=1))
    assert set(reordered.ids) == ids["test"]


def test_bbc_news_labels_come_from_folder_names():
    ds = load_dataset(DataSpec(source="builtin:bbc-news", split="train"))
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(ds) > 1500
    for doc_id, label in zip(ds.ids[:50], ds.labels[:50]):
        assert doc_id.split("/")[0] == ds.label_names[label]


def test_pipeline_defaults_keep_train_and_eval_apart():
    data = PipelineData(train=DataSpec(source="builtin:wikipedia"), eval=DataSpec(source="builtin:wikipedia"))
    assert data.dataset("train").split == "train" and data.dataset("eval").split == "test"
    assert not set(data.dataset("train").ids) & set(data.dataset("eval").ids)
    assert data.dataset("calibration").ids == data.dataset("train").ids
    with pytest.raises(DataSourceError, match="data.eval"):
        PipelineData(train=DataSpec(source="builtin:wikipedia")).dataset("eval")


def test_lm_windows_shape_limit_and_determinism():
    tok = tiny_tokenizer()
    ds = load_dataset(DataSpec(source="builtin:shakespeare", split="validation"))
    w = lm_windows(tok, ds, seq_len=64, max_tokens=1000)
    assert w.shape == (1000 // 64, 64) and w.dtype == torch.long
    assert torch.equal(w, lm_windows(tok, ds, seq_len=64, max_tokens=1000))
    first = tok(ds.texts[0], add_special_tokens=False).input_ids
    assert w.flatten()[:200].tolist() == first[:200]
    with pytest.raises(DataSourceError, match="fewer than one window of 64; lower seq_len or raise max_tokens"):
        lm_windows(tok, ds, seq_len=64, max_tokens=10)


def test_too_little_text_says_to_give_more_not_to_raise_max_tokens(tmp_path):
    """An empty or short file was told to "raise max_tokens", which cannot help: the text itself ran out."""
    (tmp_path / "short.txt").write_text("a few words")
    ds = load_dataset(DataSpec(source=str(tmp_path / "short.txt")))
    with pytest.raises(DataSourceError, match=r"short.txt \(all\) gives \d+ tokens, fewer than one window of 64; "
                                              "lower seq_len or give more text"):
        lm_windows(tiny_tokenizer(), ds, seq_len=64, max_tokens=1000)


def test_local_text_glob_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 50)
    (tmp_path / "b.txt").write_text("second document " * 50)
    ds = load_dataset(DataSpec(source=str(tmp_path / "*.txt"), split="all"))  # default splits: test_console.py
    assert ds.split == "all" and sorted(ds.texts)[0].startswith("first")
    rows = [{"body": f"text {i}", "topic": ["cats", "dogs"][i % 2]} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = DataSpec(source=str(tmp_path / "d.jsonl"), text_field="body", label_field="topic")
    ds = load_dataset(spec)
    assert ds.label_names == ["cats", "dogs"] and len(ds) == 10
    assert all(ds.label_names[label] == ["cats", "dogs"][int(t.split()[1]) % 2] for t, label in zip(ds.texts, ds.labels))
    batch = next(text_batches(tiny_tokenizer("encoder"), ds, batch_size=4, max_length=16))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert load_dataset(DataSpec(source=str(tmp_path / "d.jsonl"), text_field="body", max_examples=3)).texts.__len__() == 3
    with pytest.raises(DataSourceError, match="text_field"):
        load_dataset(DataSpec(source=str(tmp_path / "d.jsonl")))
    with pytest.raises(DataSourceError, match="no such file"):
        load_dataset(DataSpec(source=str(tmp_path / "nothing*.txt")))
    with pytest.raises(DataSourceError, match="unknown builtin data 'wikipeda'"):
        load_dataset(DataSpec(source="builtin:wikipeda"))


def test_jsonl_null_text_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n{"text": null}\n')
    with pytest.raises(DataSourceError, match=r"d.jsonl:2: field 'text' is null, not text"):
        load_dataset(DataSpec(source=str(tmp_path / "d.jsonl")))


def test_jsonl_numbers_as_strings_are_class_numbers(tmp_path):
    rows = [("a", "10"), ("b", "2"), ("c", 1)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in rows))
    ds = load_dataset(DataSpec(source=str(tmp_path / "d.jsonl")))
    assert dict(zip(ds.texts, ds.labels)) == {"a": 10, "b": 2, "c": 1} and ds.label_names[10] == "10"


def test_only_txt_files_or_one_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,a\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')
    with pytest.raises(DataSourceError, match=r"d.csv \(1 such file\(s\)\) is not a .txt file"):
        load_dataset(DataSpec(source=str(tmp_path / "d.csv")))
    with pytest.raises(DataSourceError, match=r"a.jsonl \(2 such file\(s\)\) is not a .txt file"):
        load_dataset(DataSpec(source=str(tmp_path / "*.jsonl"), split="all"))
    with pytest.raises(DataSourceError, match="holds no .txt files"):
        load_dataset(DataSpec(source=str(tmp_path)))


def test_text_file_not_utf8_is_refused(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café crème".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin.txt: not UTF-8 text \(byte 0xe9 at offset 3\); save the .txt"):
        load_dataset(DataSpec(source=str(tmp_path / "latin.txt")))


def test_negative_label_numbers_are_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": -1}\n{"text": "b", "label": 1}\n')
    with pytest.raises(DataSourceError, match=r"d.jsonl: label -1 in 'label'; class numbers start at 0"):
        load_dataset(DataSpec(source=str(tmp_path / "d.jsonl")))


def test_a_classifier_with_other_classes_than_the_data_is_bad_input(tmp_path):
    from compress.errors import ModelSourceError
    from compress.models import load_model
    from tiny_models import save_tiny, tiny_bert

    save_tiny(tiny_bert(num_labels=5), tmp_path / "m", "encoder")
    with pytest.raises(ModelSourceError, match=r"classifier with other classes than the data's 3 \(a, b, c\)"):
        load_model(str(tmp_path / "m"), "sequence-classification", label_names=["a", "b", "c"])


def test_fingerprint_follows_a_file_moved_to_another_split(tmp_path):
    from compress.data import fingerprint

    for name, text in [("x/a.txt", "moved"), ("b/b.txt", "stays"), ("c/c.txt", "too")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    spec = DataSpec(source=str(tmp_path), split="train")
    assert "moved" in load_dataset(spec).texts
    before = fingerprint(spec)
    (tmp_path / "v").mkdir()
    (tmp_path / "x/a.txt").rename(tmp_path / "v/a.txt")  # x/a.txt is in train, v/a.txt in test
    assert "moved" not in load_dataset(spec).texts and fingerprint(spec) != before


def test_hub_datasets_are_refused_with_the_way_out():
    with pytest.raises(DataSourceError, match=r"'hf:imdb': Hugging Face datasets are not read .* save the split as a .jsonl"):
        load_dataset(DataSpec(source="hf:imdb"))


def test_a_label_field_no_row_has_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "y": "cats"}\n{"text": "b", "y": "dogs"}\n')
    with pytest.raises(DataSourceError, match=r"no row has the label field 'Y' \(fields: text, y\)"):
        load_dataset(DataSpec(source=str(tmp_path / "d.jsonl"), label_field="Y"))
    assert load_dataset(DataSpec(source=str(tmp_path / "d.jsonl"))).labels is None  # the default: unlabelled


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert load_dataset(DataSpec(source=str(tmp_path / "d.jsonl"))).texts == ["hello"]
    assert load_dataset(DataSpec(source=str(tmp_path / "d.txt"))).texts == ["hello"]


def test_a_mistyped_builtin_gets_a_suggestion():
    with pytest.raises(DataSourceError, match=r"unknown builtin data 'BBC_news'; did you mean 'builtin:bbc-news'\?"):
        load_dataset(DataSpec(source="builtin:BBC_news"))


def test_a_missing_relative_path_names_the_folder_it_is_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError, match=f"relative paths are from the current folder, {tmp_path}, not the config's"):
        load_dataset(DataSpec(source="data/train.jsonl"))


def test_a_jsonl_file_splits_the_same_wherever_it_lies(tmp_path):
    """A single file's rows are split by their ids alone: the same file in another folder (a colleague's copy,
    a moved dataset) gives the same train / validation / test documents."""
    rows = "".join(f'{{"text": "document number {i}"}}\n' for i in range(200))
    for where in ("a", "b/c"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "d.jsonl").write_text(rows)
    for split in ("train", "validation", "test"):
        a, b = (sorted(load_dataset(DataSpec(source=str(tmp_path / w / "d.jsonl"), split=split)).texts)
                for w in ("a", "b/c"))
        assert a == b and 0 < len(a) < 200


def test_max_tokens_beyond_the_data_is_said_once(tmp_path, caplog):
    """A max_tokens budget the data cannot fill is a warning (once), not a silently smaller run."""
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "some words number {i}"}}\n' for i in range(20)))
    ds = load_dataset(DataSpec(source=str(tmp_path / "d.jsonl")))
    tok = tiny_tokenizer()
    with caplog.at_level("WARNING", logger="compress.run"):
        have = lm_windows(tok, ds, seq_len=8, max_tokens=10**6).numel()
        lm_windows(tok, ds, seq_len=8, max_tokens=10**6)
        lm_windows(tok, ds, seq_len=8, max_tokens=16)  # the data fills this one
    said = [r.getMessage() for r in caplog.records if "fewer than max_tokens" in r.getMessage()]
    assert len(said) == 1 and "fewer than max_tokens 1,000,000" in said[0] and 0 < have < 10**6
