#!/usr/bin/env python3
"""Vectorflow through pymilvus: the Milvus quickstart, unchanged.

Start a server (`vectorflow serve --data-dir ./data`, which listens on
127.0.0.1:19530 by default), install the client (`pip install pymilvus`),
then:

    python examples/pymilvus/quickstart.py [--uri http://127.0.0.1:19530]

It creates a collection (an int64 `id`, an 8-dimensional `vector` compared
by COSINE, and dynamic fields), inserts rows with an extra `color` key,
searches with a filter on it, queries and counts, and drops the collection.
"""

import argparse
import random
import time

from pymilvus import MilvusClient, mkts_from_unixtime


def main():
    parser = argparse.ArgumentParser(description="the Milvus quickstart against Vectorflow")
    parser.add_argument("--uri", default="http://127.0.0.1:19530", help="the server (default %(default)s)")
    parser.add_argument("--collection", default="pymilvus_quickstart")
    args = parser.parse_args()

    client = MilvusClient(uri=args.uri, timeout=30)
    name = args.collection
    if client.has_collection(name, timeout=30):
        client.drop_collection(name, timeout=30)

    # id (int64 primary key) + vector (float_vector(8), COSINE), dynamic fields on.
    client.create_collection(name, dimension=8, timeout=30)

    rnd = random.Random(7)
    colors = ["red", "green", "blue"]
    rows = [
        {"id": i, "vector": [rnd.uniform(-1, 1) for _ in range(8)], "color": colors[i % 3], "rank": i}
        for i in range(1000)
    ]
    result = client.insert(name, rows, timeout=30)
    print(f"inserted {result['insert_count']} rows")

    query = rows[42]["vector"]
    hits = client.search(
        name,
        data=[query],
        limit=5,
        filter='color == "red" and rank < 500',
        output_fields=["color", "rank"],
        search_params={"params": {"ef": 64}},
        timeout=30,
    )
    print("5 nearest red rows with rank < 500 (id, cosine similarity, fields):")
    for hit in hits[0]:
        print(f"  {hit['id']:>4}  {hit['distance']:.4f}  {hit['entity']}")

    blue = client.query(name, filter='color == "blue"', output_fields=["color", "rank"], limit=3, timeout=30)
    print("3 blue rows:", list(blue))
    count = client.query(name, output_fields=["count(*)"], timeout=30)[0]["count(*)"]
    print(f"count(*) = {count}")

    # A hybrid timestamp of now (pymilvus's helper makes Vectorflow's layout,
    # ms << 18), for the time-travel search below.
    before_delete = mkts_from_unixtime(time.time())
    time.sleep(0.01)
    deleted = client.delete(name, filter='color == "green"', timeout=30)
    # {'delete_count': n} (older servers answer with the deleted keys instead)
    n = len(deleted) if isinstance(deleted, list) else deleted["delete_count"]
    print(f"deleted {n} green rows")
    count = client.query(name, output_fields=["count(*)"], timeout=30)[0]["count(*)"]
    print(f"count(*) = {count}")

    # Time travel (Vectorflow; Milvus 2.5 has none): the search as of before
    # the delete still finds green row 1, which is gone now.
    green = rows[1]["vector"]
    then = client.search(
        name, data=[green], limit=1, search_params={"params": {"ef": 64, "travel_timestamp": before_delete}}, timeout=30
    )
    now = client.search(name, data=[green], limit=1, consistency_level="Strong", timeout=30)
    print(f"nearest to row 1: as of before the delete {then[0][0]['id']}, now {now[0][0]['id']}")

    print("get(ids=[0, 1, 2]):", list(client.get(name, ids=[0, 1, 2], output_fields=["color", "rank"], timeout=30)))
    client.drop_collection(name, timeout=30)


if __name__ == "__main__":
    main()
