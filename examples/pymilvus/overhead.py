"""Per-call cost of pymilvus's MilvusClient.search over a raw gRPC Search
with a prebuilt request, on the same server and an existing collection of
pypi-100k (e.g. the `bench_grpc` collection `vectorflow bench --addr` leaves).

usage: overhead.py URI COLLECTION QUERIES [DATASET_DIR]
"""
import json
import sys
import time

import numpy as np
import grpc
from pymilvus import MilvusClient
from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc, common_pb2

uri, collection, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
dataset = sys.argv[4] if len(sys.argv) > 4 else "../shared/datasets/pypi-100k"
queries = np.load(f"{dataset}/queries.npy").astype(np.float32)[:n]
gt = np.load(f"{dataset}/gt_unfiltered_ids.npy")[:n, :10]

def recall(results):
    return float(np.mean([len(set(r) & set(g)) / 10 for r, g in zip(results, gt)]))

client = MilvusClient(uri=uri, timeout=30)
for q in queries[:10]:
    client.search(collection, [q.tolist()], limit=10, search_params={"params": {"ef": 64}}, consistency_level="Bounded", timeout=30)
lat = []; got = []
start = time.perf_counter()
for q in queries:
    t = time.perf_counter()
    res = client.search(collection, [q.tolist()], limit=10, search_params={"params": {"ef": 64}}, consistency_level="Bounded", timeout=30)
    lat.append(time.perf_counter() - t); got.append([h["id"] for h in res[0]])
wall = time.perf_counter() - start
print(f"MilvusClient.search : {n/wall:7.1f} QPS  p50 {np.percentile(lat,50)*1e3:.2f} ms  p99 {np.percentile(lat,99)*1e3:.2f} ms  recall {recall(got):.4f}")

channel = grpc.insecure_channel(uri.replace("http://", ""))
stub = milvus_pb2_grpc.MilvusServiceStub(channel)
def request(q):
    group = common_pb2.PlaceholderGroup(placeholders=[common_pb2.PlaceholderValue(tag="$0", type=common_pb2.PlaceholderType.FloatVector, values=[q.tobytes()])])
    params = [common_pb2.KeyValuePair(key="topk", value="10"), common_pb2.KeyValuePair(key="params", value=json.dumps({"ef": 64}))]
    return milvus_pb2.SearchRequest(collection_name=collection, placeholder_group=group.SerializeToString(), nq=1,
                                    dsl_type=common_pb2.DslType.BoolExprV1, search_params=params, consistency_level=common_pb2.ConsistencyLevel.Bounded)
requests = [request(q) for q in queries]
for r in requests[:10]:
    stub.Search(r, timeout=30)
lat = []; got = []
start = time.perf_counter()
for r in requests:
    t = time.perf_counter()
    res = stub.Search(r, timeout=30)
    lat.append(time.perf_counter() - t)
    assert res.status.code == 0, res.status
    got.append(list(res.results.ids.int_id.data))
wall = time.perf_counter() - start
print(f"raw stub Search     : {n/wall:7.1f} QPS  p50 {np.percentile(lat,50)*1e3:.2f} ms  p99 {np.percentile(lat,99)*1e3:.2f} ms  recall {recall(got):.4f}")
