import re
from pathlib import Path

from setuptools import find_packages, setup

# Read, not imported: the build runs before the package's dependencies exist.
__version__ = re.search(
    r'__version__ = "([^"]+)"', (Path(__file__).parent / "simplepush" / "__init__.py").read_text()
).group(1)

setup(
    name="simplepush",
    version=__version__,
    description="A push server: SimplePush and WebPush devices over one WebSocket protocol.",
    packages=find_packages(exclude=["tests", "tests.*"]),
    # The dashboard's page, script and style are served from the installed package.
    package_data={"simplepush": ["dashboard/*.html", "dashboard/*.js", "dashboard/*.css"]},
    python_requires=">=3.11",
    install_requires=[
        "tornado>=6.4,<7",
        "cryptography>=42",
        "pymemcache>=4,<5",
        "statsd>=4,<5",
        "python-json-logger>=3.1,<5",
        # VAPID (RFC 8292): ES256 JWTs verified by PyJWT over cryptography.
        "PyJWT>=2.8,<3",
        # libuv's event loop under asyncio: 10-15% less CPU per device (docs/PERFORMANCE.md).
        "uvloop>=0.19",
        # llhttp (Node.js's HTTP parser, as uvicorn uses it) for the public port's HTTP/1.1.
        "httptools>=0.9",
        # JSON in Rust for the records in memcached and the hop between nodes: a tenth of
        # json's CPU per record (docs/PERFORMANCE.md).
        "orjson>=3.9",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-tornado>=0.8.1",
            "hypothesis>=6",
            "ruff>=0.6",
            "websocket-client>=1.6",
            "selenium>=4.10",
            # A real WebPush sender (brings py-vapid and http_ece) for the WebPush tests.
            "pywebpush>=2,<3",
        ],
    },
    entry_points={
        "console_scripts": [
            "simplepush = simplepush.cli:main",
            "simplepush-bench = simplepush.bench.cli:main",
        ],
    },
)
