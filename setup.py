"""Optional compiled build: DEVICEGATE_COMPILE=1 compiles the data plane with mypyc.

Everything else (metadata, dependencies, entry points) is in pyproject.toml. The compiled
modules are the ones every proxied request runs through; they stay plain, typed Python, and
without DEVICEGATE_COMPILE (the default, and every editable install) they run as such.
Compiling needs a C compiler, the Python headers and mypy in the build environment:

    pip install setuptools mypy
    DEVICEGATE_COMPILE=1 pip install --no-build-isolation '.[speed]'

bench/run and the Docker image build it so; CI runs the whole test suite on both builds.
"""

from __future__ import annotations

import os

from setuptools import setup

# The request's path: parsing and framing, the envelope of the gateway's own answers, the
# exchange, the upstream pool, the verdict, the one script call (its arguments, packing and
# circuit breaker), the embedded store's enforce (its record, buckets and list order), the
# counters and the value types. The admin side and the Store's redis-py code stay plain,
# and so does dataplane/sides.py: tests subclass its two base classes, and an interpreted
# class cannot inherit from a compiled one.
HOT_MODULES = [
    "gateway/dataplane/wire.py",
    "gateway/envelope.py",
    "gateway/answers.py",
    "gateway/dataplane/plane.py",
    "gateway/dataplane/connection.py",
    "gateway/dataplane/forwarding.py",
    "gateway/dataplane/exchange.py",
    "gateway/dataplane/report.py",
    "gateway/dataplane/upload.py",
    "gateway/dataplane/body.py",
    "gateway/dataplane/flow.py",
    "gateway/dataplane/upstream.py",
    "gateway/enforce.py",
    "gateway/identity.py",
    "gateway/ratelimit.py",
    "gateway/store/enforce_script.py",
    "gateway/store/pipeline.py",
    "gateway/store/keys.py",
    "gateway/store/slots.py",
    "gateway/store/cluster_scripts.py",
    "gateway/store/breaker.py",
    "gateway/store/native.py",
    "gateway/store/native_record.py",
    "gateway/store/native_bucket.py",
    "gateway/store/native_order.py",
    "gateway/metrics.py",
    "gateway/model.py",
]

ext_modules = []
if os.environ.get("DEVICEGATE_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(HOT_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
