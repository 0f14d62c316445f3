"""The lab server: master galleries per project and species, registered devices, pushed sightings.

* :mod:`fieldreid.server.db` — the database (SQLite file or PostgreSQL), signing key, crop store, bundles.
* :mod:`fieldreid.server.ingest` — push chunks: content checks and exactly-once storage.
* :mod:`fieldreid.server.admin` — projects, devices, gallery import, confirm / merge (lab CLI only).
* :mod:`fieldreid.server.app` — the FastAPI app devices talk to; ``fieldreid serve`` runs it.
* :mod:`fieldreid.server.signing` — ed25519 signed bundles (shared with the device side).
* :mod:`fieldreid.server.fields` — species-name pattern and text checks (shared with the device side).

Needs the ``server`` extra (FastAPI, uvicorn, SQLAlchemy, psycopg, cryptography, msgpack); importing this
package itself imports none of them.
"""
