"""Proto <-> dataclass conversion round trips, and the generated-code check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.core.types import InstanceLoad, Role
from protos import generate
from protos.pdserve.v1 import worker_pb2 as pb
from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransferDescriptor, TransferStats, TransportKind
from workers.service import convert
from workers.service.types import GenerateMode, PrefillResult, Reservation, StreamFinish, TokenChunk


def test_every_message_round_trips() -> None:
    sampling = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11,
                              stop_token_ids=(2, 5), stop=("\n\n",), ignore_eos=True)
    assert convert.sampling_from_pb(convert.sampling_to_pb(sampling)) == sampling
    unseeded = SamplingParams(max_tokens=3)
    assert convert.sampling_from_pb(convert.sampling_to_pb(unseeded)).seed is None
    desc = TransferDescriptor("r1", TransportKind.TCP, "127.0.0.1:5000", 33, 4, 2, 64, "float32", host_id="boot-1")
    res = Reservation(desc, num_blocks=3)
    assert convert.reservation_from_pb(pb.ReserveKVResponse.FromString(
        convert.reservation_to_pb(res).SerializeToString())) == res
    stats = TransferStats("r1", TransportKind.TCP, 1024, 4, 0.01, 0.001, wire_s=0.005)
    for result in (PrefillResult(42, "x", stats), PrefillResult(42, "", None)):
        assert convert.prefill_result_from_pb(convert.prefill_result_to_pb(result)) == result
    for chunk in (TokenChunk((1, 2), "ab", None, 5, 2), TokenChunk((), "", StreamFinish.LENGTH, 5, 9)):
        assert convert.chunk_from_pb(convert.chunk_to_pb(chunk)) == chunk
    for mode in GenerateMode:
        assert convert.mode_from_pb(convert.mode_to_pb(mode)) is mode
    load = InstanceLoad("decode-0-g0", Role.DECODE, node_id="n1", queued_prefill_tokens=9, waiting_requests=1,
                        running_requests=2, free_kv_blocks=3, total_kv_blocks=4, block_size=16,
                        max_running_requests=8, recent_ttft_s=0.5, reported_at_s=7.0)
    assert convert.load_from_pb(convert.load_to_pb(load), reported_at_s=7.0) == load


def test_bad_messages_raise_protocol_errors() -> None:
    with pytest.raises(convert.ProtocolError, match="transport kind"):
        convert.descriptor_from_pb(pb.TransferDescriptor(request_id="r", kind="carrier-pigeon"))
    with pytest.raises(convert.ProtocolError, match="generate mode"):
        convert.mode_from_pb(0)
    with pytest.raises(convert.ProtocolError, match="without a descriptor"):
        convert.reservation_from_pb(pb.ReserveKVResponse())
    with pytest.raises(convert.ProtocolError, match="no valid role"):
        convert.load_from_pb(pb.LoadReport(instance_id="x"), 0.0)


def test_generated_code_is_up_to_date_and_a_stale_copy_is_caught(tmp_path: Path) -> None:
    assert generate.check() == []
    root = tmp_path / "protos"
    shutil.copytree(generate.PROTO_ROOT / "pdserve", root / "pdserve")
    proto = root / "pdserve" / "v1" / "worker.proto"
    proto.write_text(proto.read_text().replace("message AbortResponse {", "message Extra {}\n\nmessage AbortResponse {"))
    problems = generate.check(root)
    assert any(p.startswith("stale:") and p.endswith("worker_pb2.py") for p in problems)
    generated = (generate.PROTO_ROOT / "pdserve" / "v1" / "worker_pb2_grpc.py").read_text()
    assert "from protos.pdserve.v1 import worker_pb2" in generated  # imports fixed for the package layout
