#!/usr/bin/env python3
"""Calls imgsvc with grpcio (gRPC C-core), for tests/it/interop_grpcio.rs
and tests/it/connection_ageing.rs.

Reads one JSON job on stdin:

    {"target": "127.0.0.1:PORT", "server_name": "localhost",
     "ca": PATH, "cert": PATH, "key": PATH, "proto_dir": PATH,
     "calls": [{"rpc": "RotateImage" | "MeanFilter" | "Process" | "HealthCheck",
                "request": {...}},
               {"rpc": "ProcessStream", "requests": [{...}, ...]}]}

Requests are protobuf messages in the proto3 JSON mapping (bytes in
base64), built by field name from stubs that grpcio-tools generates here
from `proto_dir`. Writes one JSON object on stdout: {"grpcio": version,
"results": [...]}, one result per call, in order: {"response": {...}},
{"responses": [{...}, ...]} for ProcessStream, or {"error": {"code":
"INVALID_ARGUMENT", "details": "..."}}; a call with "status_details": true
adds the decoded google.rpc.Status details to its error (see status_details). Anything else (no server, bad
certificates) ends the script with a traceback and a non-zero exit.

A job with "load" instead of "calls" keeps one unary call going from each
of several threads, all on the one channel, for a time (for
tests/it/connection_ageing.rs):

    "load": {"seconds": 6, "threads": 4, "rpc": "Process", "request": {...},
             "expect": {...}}

and writes {"grpcio": version, "ok": n, "failed": n, "failures": [{"code",
"details"}, ...]}: every call that did not end in a response equal to
"expect" (the response message in the proto3 JSON mapping) is a failure,
with its status code and details, or the code "WRONG_ANSWER" and the start
of what came back. The channel sets no retry policy (grpcio's default:
C-core's transparent retries only), so what the client does on its own is
what is measured. At most 100 failures are listed ("failed" counts all).
"""

import importlib
import json
import sys
import tempfile
import threading
import time

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

PROTOS = ["nlimage.proto", "imgsvc/v1/imgsvc.proto"]
CALL_TIMEOUT_SECS = 30
LISTED_FAILURES = 100


def generate_stubs(proto_dir, out_dir):
    args = ["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        sys.exit(f"grpcio-tools could not compile {PROTOS} from {proto_dir}")
    sys.path.insert(0, out_dir)
    modules = ["nlimage_pb2", "nlimage_pb2_grpc", "imgsvc.v1.imgsvc_pb2", "imgsvc.v1.imgsvc_pb2_grpc"]
    return [importlib.import_module(m) for m in modules]


def message_dict(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def status_details(e):
    """The google.rpc.Status details of a failed call, decoded the way a
    grpcio application does (grpcio-status), with the pushback header."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    out = {"pushback_ms": dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")}
    status = rpc_status.from_call(e)
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            out["retry_delay_ms"] = info.retry_delay.ToMilliseconds()
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            out["quota_violations"] = [message_dict(v) for v in failure.violations]
    return out


def load(spec, unary):
    """Calls `spec["rpc"]` from `spec["threads"]` threads for `spec["seconds"]`;
    counts the answers equal to `spec["expect"]` and lists the rest."""
    method, request_type = unary[spec["rpc"]]
    request = json_format.ParseDict(spec["request"], request_type())
    expect = spec["expect"]
    deadline = time.monotonic() + spec["seconds"]
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    failures = []

    def fail(failure):
        with lock:
            counts["failed"] += 1
            if len(failures) < LISTED_FAILURES:
                failures.append(failure)

    def caller():
        while time.monotonic() < deadline:
            try:
                got = message_dict(method(request, timeout=CALL_TIMEOUT_SECS))
            except grpc.RpcError as e:
                fail({"code": e.code().name, "details": e.details()})
                continue
            if got == expect:
                with lock:
                    counts["ok"] += 1
            else:
                fail({"code": "WRONG_ANSWER", "details": json.dumps(got)[:200]})

    threads = [threading.Thread(target=caller) for _ in range(spec["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**counts, "failures": failures}


def main():
    job = json.load(sys.stdin)
    with tempfile.TemporaryDirectory(prefix="imgsvc-stubs-") as stubs:
        nl_pb2, nl_grpc, v1_pb2, v1_grpc = generate_stubs(job["proto_dir"], stubs)

        def read(key):
            with open(job[key], "rb") as f:
                return f.read()

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("ca"), private_key=read("key"), certificate_chain=read("cert")
        )
        options = [("grpc.ssl_target_name_override", job["server_name"])]
        with grpc.secure_channel(job["target"], credentials, options=options) as channel:
            nl = nl_grpc.NLImageServiceStub(channel)
            v1 = v1_grpc.ImageServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            unary = {
                "RotateImage": (nl.RotateImage, nl_pb2.NLImageRotateRequest),
                "MeanFilter": (nl.MeanFilter, nl_pb2.NLImage),
                "Process": (v1.Process, v1_pb2.ProcessRequest),
                "HealthCheck": (health.Check, health_pb2.HealthCheckRequest),
            }
            if "load" in job:
                report = load(job["load"], unary)
                json.dump({"grpcio": grpc.__version__, **report}, sys.stdout)
                return
            results = []
            for call in job["calls"]:
                try:
                    if call["rpc"] == "ProcessStream":
                        requests = [json_format.ParseDict(r, v1_pb2.ProcessStreamRequest()) for r in call["requests"]]
                        responses = v1.ProcessStream(iter(requests), timeout=CALL_TIMEOUT_SECS)
                        results.append({"responses": [message_dict(r) for r in responses]})
                    else:
                        method, request_type = unary[call["rpc"]]
                        request = json_format.ParseDict(call["request"], request_type())
                        results.append({"response": message_dict(method(request, timeout=CALL_TIMEOUT_SECS))})
                except grpc.RpcError as e:
                    error = {"code": e.code().name, "details": e.details()}
                    if call.get("status_details"):
                        error["status_details"] = status_details(e)
                    results.append({"error": error})
    json.dump({"grpcio": grpc.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
