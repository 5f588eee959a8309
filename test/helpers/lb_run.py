"""200 requests (a third streamed) through inferneo.LoadBalancedClient over the replicas
given, 8 threads at once; kills the first pid at request 40 (SIGKILL) and drains the
second at request 100 (SIGTERM). Prints one JSON line of counts and latencies."""
import json
import os
import signal
import sys
import threading
import time

from inferneo import LoadBalancedClient

args = sys.argv[1:]
pids = [int(p) for p in args[args.index("--pids") + 1].split(",")]
urls = args[: args.index("--pids")]
REQUESTS, CONCURRENCY, KILL_AT, DRAIN_AT = 200, 8, 40, 100

lb = LoadBalancedClient(urls, backoff=0.2)
lock = threading.Lock()
counter = {"next": 0}
result = {"ok": 0, "streams_ok": 0, "cut_after_token": 0, "failed": []}
latencies = []


def take():
    with lock:
        i = counter["next"]
        counter["next"] += 1
    if i == KILL_AT:
        os.kill(pids[0], signal.SIGKILL)
    if i == DRAIN_AT:
        os.kill(pids[1], signal.SIGTERM)
    return i


def worker():
    while True:
        i = take()
        if i >= REQUESTS:
            return
        t0 = time.time()
        body = dict(model="tiny", prompt="request %d" % i, max_tokens=24, ignore_eos=True, temperature=0)
        if i % 3 == 0:
            tokens, finish = False, None
            try:
                for c in lb.completions.create(stream=True, **body):
                    tokens = tokens or any(x.get("text") for x in c.choices)
                    finish = c.choices[0].finish_reason if c.choices else finish
                key = "streams_ok" if finish == "length" else None
            except Exception as e:  # noqa: BLE001 - every failure is counted
                key = "cut_after_token" if tokens else "stream %d: %r" % (i, e)
        else:
            try:
                r = lb.completions.create(**body)
                key = "ok" if r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24 else "request %d: %r" % (i, r)
            except Exception as e:  # noqa: BLE001
                key = "request %d: %r" % (i, e)
        with lock:
            latencies.append((time.time() - t0) * 1000)
            if key in ("ok", "streams_ok", "cut_after_token"):
                result[key] += 1
            else:
                result["failed"].append(key or "stream %d ended without finishing" % i)


threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
for t in threads:
    t.start()
for t in threads:
    t.join()
latencies.sort()
result["p50_ms"] = round(latencies[len(latencies) // 2])
result["p99_ms"] = round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])
print(json.dumps(result))
