"""Client of MEM1's retrieval contract (MEM1's retrieval_server.py, and mem1_fast.retrieval.server):

    POST {url} {"queries": [...], "topk": k, "return_scores": true}
      -> {"result": [[{"document": {"id", "contents"}, "score"}, ...] per query]}

Timeouts, retries with exponential backoff on what may pass (refused or dropped connections, timeouts, HTTP 5xx and
429), and a batch of queries split into requests of at most `max_batch` sent `workers` at a time. What does not
pass (HTTP 4xx, a malformed body) or still fails after the retries raises RetrievalError, which the agent loop turns
into an observation the agent sees, never a crash.
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .corpus import Doc, RetrievalError, _doc_from_dict

_TRANSIENT_HTTP = {429, 500, 502, 503, 504}


class HttpRetriever:
    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 max_batch: int = 64, workers: int = 4):
        if retries < 0 or max_batch < 1 or workers < 1 or not timeout > 0:
            raise ValueError(f"HttpRetriever: need timeout > 0, retries >= 0, max_batch >= 1, workers >= 1 "
                             f"(got {timeout}, {retries}, {max_batch}, {workers})")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.max_batch, self.workers = max_batch, workers

    def search(self, queries: list[str], topk: int) -> list[list[tuple[Doc, float]]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not a single string")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        # Empty queries get [] locally (same as BM25Retriever); the server never sees them.
        sent = [q for q in queries if q.strip()]
        chunks = [sent[i:i + self.max_batch] for i in range(0, len(sent), self.max_batch)]
        if len(chunks) > 1 and self.workers > 1:
            with ThreadPoolExecutor(min(self.workers, len(chunks))) as pool:
                parts = list(pool.map(lambda c: self._post(c, topk), chunks))
        else:
            parts = [self._post(c, topk) for c in chunks]
        results = iter([hits for part in parts for hits in part])
        return [next(results) if q.strip() else [] for q in queries]

    def _post(self, queries: list[str], topk: int) -> list[list[tuple[Doc, float]]]:
        body = json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                err = RetrievalError(f"retriever at {self.url} returned HTTP {e.code}: {detail}")
                if e.code not in _TRANSIENT_HTTP:
                    raise err from e  # our request is wrong: retrying sends the same
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, DNS, timeout,
                # a connection dropped mid-response (IncompleteRead, BadStatusLine)
                err = RetrievalError(f"retriever at {self.url} unreachable: {getattr(e, 'reason', e)}")
            if attempt == self.retries:
                raise RetrievalError(f"{err} (after {self.retries + 1} attempts)")
            time.sleep(self.backoff * 2 ** attempt)
        try:
            result = json.loads(raw)["result"]
            if not isinstance(result, list) or len(result) != len(queries):
                got = len(result) if isinstance(result, list) else type(result).__name__
                raise ValueError(f"expected {len(queries)} result lists, got {got}")
            return [[(_doc_from_dict(h["document"], "hit"), float(h["score"])) for h in hits] for hits in result]
        except (ValueError, KeyError, TypeError) as e:
            raise RetrievalError(f"retriever at {self.url} sent a malformed body "
                                 f"({type(e).__name__}: {e}): {raw[:200]!r}") from e
