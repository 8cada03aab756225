"""GetTokenizerFiles and the content hash on every answer: what lets the gateway
detokenize in process with the tokenizer service's own files, and prove it."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from support import ServerThread

from llmsuite.runtime.tokenizer_hash import TOKENIZER_FILES, content_hash_of, tokenizer_content_hash
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc


@pytest.fixture
def model_dir(tiny_tokenizer_dir: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, directory)
    (directory / "notes.txt").write_text("not a tokenizer file")  # must never be handed out
    return directory


def test_files_hash_to_the_reported_hash_and_nothing_else_leaves(model_dir: Path):
    with ServerThread(TokenizerApp({"m": model_dir}, TokenizerLimits())) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model="m")).info
        files = stub.GetTokenizerFiles(pb.GetTokenizerFilesRequest(model="m"))
        assert files.content_hash == info.content_hash == tokenizer_content_hash(model_dir)
        names = [f.name for f in files.files]
        assert names == [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
        assert "tokenizer.json" in names
        for f in files.files:
            assert f.content == (model_dir / f.name).read_bytes()
        assert content_hash_of({f.name: f.content for f in files.files}) == files.content_hash

        cached = stub.GetTokenizerFiles(pb.GetTokenizerFilesRequest(model="m", known_content_hash=info.content_hash))
        assert cached.content_hash == info.content_hash and not cached.files  # the caller's copy is current
        stale = stub.GetTokenizerFiles(pb.GetTokenizerFilesRequest(model="m", known_content_hash="sha256:old"))
        assert [f.name for f in stale.files] == names

        with pytest.raises(grpc.RpcError) as exc_info:
            stub.GetTokenizerFiles(pb.GetTokenizerFilesRequest(model="nope"))
        assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_answer_names_the_tokenizer_that_produced_it_across_a_reload(model_dir: Path):
    with ServerThread(TokenizerApp({"m": model_dir}, TokenizerLimits())) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        before = tokenizer_content_hash(model_dir)

        def hashes() -> set[str]:
            return {
                stub.Encode(pb.EncodeRequest(model="m", texts=["hi"])).content_hash,
                stub.CountTokens(pb.CountTokensRequest(model="m", texts=["hi"])).content_hash,
                stub.Decode(pb.DecodeRequest(model="m", sequences=[pb.TokenIds(token_ids=[5])])).content_hash,
            }

        assert hashes() == {before}
        config = model_dir / "tokenizer_config.json"
        config.write_text(config.read_text().replace("}", ', "comment": "changed"}', 1))
        after = stub.Reload(pb.ReloadRequest(model="m")).info.content_hash
        assert after != before and hashes() == {after}
        files = stub.GetTokenizerFiles(pb.GetTokenizerFilesRequest(model="m", known_content_hash=before))
        assert files.content_hash == after and files.files
