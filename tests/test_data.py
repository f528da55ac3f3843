from __future__ import annotations

import gzip
import json

import pytest
import torch

from lmshrink.data.sources import DataError, Framing, blocks, documents, pack, token_stream


def test_text_folder_and_jsonl_sources(tmp_path, gpt2_tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second document")
    (tmp_path / "docs" / "a.md").write_text("first document")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG\x00\x00")  # not a text suffix: ignored
    assert list(documents(str(tmp_path / "docs"))) == ["first document", "second document"]
    lines = tmp_path / "d.jsonl.gz"
    with gzip.open(lines, "wt") as f:
        f.write(json.dumps({"text": "Hello world"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    tokens = token_stream(str(lines), gpt2_tokenizer)
    again = gpt2_tokenizer("again")["input_ids"]
    assert tokens.tolist() == [15496, 995, 50256, *again, 50256]  # EOS between documents


def test_max_tokens_and_blocks(real_text, gpt2_tokenizer):
    tokens = token_stream(str(real_text), gpt2_tokenizer, max_tokens=300)
    assert tokens.numel() == 300
    assert blocks(tokens, 128).shape == (2, 128)
    with pytest.raises(DataError, match="fewer than one block"):
        blocks(torch.arange(5), 8)


@pytest.mark.parametrize("content,message", [
    (b"", "no text"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_files_are_named(tmp_path, gpt2_tokenizer, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        token_stream(str(path), gpt2_tokenizer)


def test_bad_jsonl_and_missing_paths(tmp_path, gpt2_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        token_stream(str(path), gpt2_tokenizer)
    path.write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        token_stream(str(path), gpt2_tokenizer)
    with pytest.raises(DataError, match="hf:NAME"):
        token_stream(str(tmp_path / "nowhere.txt"), gpt2_tokenizer)


def test_hub_dataset_path_streams_a_local_dataset(tmp_path, gpt2_tokenizer):
    """The hf: code path, offline: `datasets` loads a local dataset folder the same way as a Hub id."""
    folder = tmp_path / "tiny_dataset"
    folder.mkdir()
    (folder / "test.jsonl").write_text(json.dumps({"text": "Hello world"}) + "\n")
    (folder / "train.jsonl").write_text(json.dumps({"text": "unused"}) + "\n")
    assert list(documents(f"hf:{folder}::test")) == ["Hello world"]
    assert token_stream(f"hf:{folder}", gpt2_tokenizer).tolist()[:1] == gpt2_tokenizer("unused")["input_ids"][:1]


def test_training_sources_refuse_bad_files_by_name(tmp_path):
    from lmshrink.data.sources import text_dataset

    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="bad.txt is not UTF-8"):
        text_dataset([str(tmp_path)])
    (tmp_path / "bad.txt").unlink()
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a record"}) + "\n")
    assert sorted(text_dataset([str(tmp_path)])["text"]) == ["a record", "fine text"]


def test_packing_is_cached_by_text_tokenizer_and_block_size(real_text, gpt2_tokenizer, tmp_path):
    """The packed blocks are keyed by the source table, the tokenizer's definition and the block
    size (not by pickling the tokenizer): the same inputs hit the cache, any change misses it."""
    import copy

    from datasets import load_dataset

    source = load_dataset("text", data_files=str(real_text), sample_by="document", split="train",
                          cache_dir=str(tmp_path))
    first, again = pack(source, gpt2_tokenizer, 64), pack(source, gpt2_tokenizer, 64)
    assert first._fingerprint == again._fingerprint and first["input_ids"] == again["input_ids"]
    assert pack(source, gpt2_tokenizer, 32)._fingerprint != first._fingerprint
    other = copy.deepcopy(gpt2_tokenizer)
    other.add_tokens(["lmshrink-new-token"])
    changed = pack(source, other, 64)
    assert changed._fingerprint != first._fingerprint
    ids = gpt2_tokenizer(real_text.read_text(), add_special_tokens=False)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert first["input_ids"][0] == ids[:64]  # and the blocks are the text's tokens


def test_data_weights_are_shares_of_tokens_not_documents(tmp_path, gpt2_tokenizer):
    from lmshrink.heal.corpus import DataArgs, prepare_data

    long, short = tmp_path / "long.jsonl", tmp_path / "short.jsonl"  # 4 documents of 600 words, 400 of 6
    long.write_text("".join(json.dumps({"text": " apple" * 600}) + "\n" for _ in range(4)))
    short.write_text("".join(json.dumps({"text": " pear" * 6}) + "\n" for _ in range(400)))
    apple = gpt2_tokenizer(" apple")["input_ids"][0]

    def share(weights, heldout=0.0):
        train, heldout_blocks = prepare_data(DataArgs(data=[str(long), str(short)], data_weights=weights,
                                                      block_size=16, heldout=heldout), gpt2_tokenizer)
        rows = train["input_ids"]
        return sum(apple in r for r in rows) / len(rows), len(rows), heldout_blocks

    apples, n, _ = share([1, 1])  # by documents, 1:1 would give the long source ~100x the short one's tokens
    assert 0.4 < apples < 0.6 and n > 250
    assert 0.15 < share([1, 3])[0] < 0.35
    assert share([1, 0])[0] == 1.0  # a weight of 0 leaves that source out
    apples, _, heldout_blocks = share([1, 1], heldout=0.25)  # each source gives its share of held-out documents
    assert 0 < sum(apple in r for r in heldout_blocks["input_ids"]) < heldout_blocks.num_rows


def test_a_weighted_source_too_small_is_named(tmp_path, gpt2_tokenizer):
    from lmshrink.heal.corpus import DataArgs, prepare_data

    (tmp_path / "one.txt").write_text("a single short document")
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"text": "word " * 50}) + "\n" for _ in range(10)))
    args = dict(data=[str(tmp_path / "many.jsonl"), str(tmp_path / "one.txt")], data_weights=[1, 1], block_size=16)
    with pytest.raises(DataError, match=r"\(.*one.txt\) holds 1 document\(s\), too few to hold out"):
        prepare_data(DataArgs(**args), gpt2_tokenizer)
    with pytest.raises(DataError, match=r"\(.*one.txt\) holds less than one block of 16 tokens"):
        prepare_data(DataArgs(**args, heldout=0), gpt2_tokenizer)
    train, _ = prepare_data(DataArgs(**{**args, "data_weights": [1, 0]}, heldout=0), gpt2_tokenizer)
    assert train.num_rows > 0  # a source of weight 0 is not read, so not refused


def test_framing_is_read_from_the_tokenizer(tokenizers):
    none, bos, two = (Framing.of(tokenizers[k]) for k in ("none", "bos", "two"))
    s, e = (tokenizers["two"].convert_tokens_to_ids(t) for t in ("<s>", "</s>"))
    eos = tokenizers["none"].eos_token_id
    assert (none.start, none.end) == ((), ())
    assert bos.start == (tokenizers["bos"].convert_tokens_to_ids("<bos>"),) and bos.end == ()
    assert (two.start, two.end) == ((s,), (e,))
    assert none.document([7, 8]) == [7, 8, eos]
    assert bos.document([7, 8]) == [bos.start[0], 7, 8, eos]
    assert two.document([7, 8]) == [s, 7, 8, e, eos]
    assert bos.record(tokenizers["bos"]) == {"start": ["<bos>"], "end": [], "eos": "<|endoftext|>"}


def test_every_row_and_stream_starts_as_the_model_saw_text(real_text, tokenizers):
    for name, tokenizer in tokenizers.items():
        framing = Framing.of(tokenizer)
        stream = token_stream(str(real_text), tokenizer)
        text = tokenizer(real_text.read_text(), add_special_tokens=False)["input_ids"]
        assert stream.tolist() == framing.document(text), name  # one document, framed as in training
        rows = blocks(stream, 64, framing)
        assert all(framing.opens(row) for row in rows), name
        # the rows hold the stream in order: every token once, the start tokens put in front of each
        # row that does not already begin a document
        p = len(framing.start)
        body = [t for i, row in enumerate(rows.tolist()) for t in (row if i == 0 else row[p:])]
        assert body == stream.tolist()[: len(body)], name
        assert rows.shape[1] == 64


def test_rows_keep_a_documents_own_start_tokens():
    framing = Framing(start=(1,), eos=2)
    stream = [1, 5, 6, 2, 1, 7, 8, 9, 2]  # two documents, each with its own start token
    assert framing.rows(stream, 4) == [[1, 5, 6, 2], [1, 7, 8, 9]]
    assert framing.rows([5, 6, 7, 8, 9, 10, 11], 4) == [[1, 5, 6, 7], [1, 8, 9, 10]]
    with pytest.raises(DataError, match="no room"):
        framing.rows(stream, 1)


def test_packed_training_blocks_start_with_the_start_tokens(real_text, tokenizers):
    from lmshrink.data.sources import text_dataset

    for name, tokenizer in tokenizers.items():
        framing = Framing.of(tokenizer)
        packed = pack(text_dataset([str(real_text)]), tokenizer, 32)
        assert len(packed) > 5
        assert all(framing.opens(row) for row in packed["input_ids"]), name
