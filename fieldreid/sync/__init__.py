"""Device ↔ lab sync: pull signed galleries, push sightings through a persistent queue.

* :mod:`fieldreid.sync.client` — HTTP client, retries, config and token handling.
* :mod:`fieldreid.sync.queue` — the offline outbox inside the gallery file.
* :mod:`fieldreid.sync.apply` — atomic application of a verified bundle, merges included.

Needs the ``sync`` extra (httpx, cryptography, msgpack).
"""
