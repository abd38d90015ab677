"""The fake-engine gateway (`tests.tenancy_app`) served the way a replica serves it: uvicorn
with `LastWordsProtocol`, `LastWordsMarks` outermost and a keeper started, for tests that
SIGKILL it (`python -m tests.last_words_server PORT`, configured like tests.tenancy_app)."""

from __future__ import annotations

import sys

import uvicorn

from serve.gateway.last_words import LastWords, LastWordsMarks, LastWordsProtocol, install
from tests.tenancy_app import create_app

HEADER_TIMEOUT_S = 10.0


def main(port: int) -> None:
    keeper = LastWords()
    keeper.start()
    install(keeper, HEADER_TIMEOUT_S)
    app = LastWordsMarks(create_app())
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=LastWordsProtocol, log_level="warning"
    )
    try:
        uvicorn.Server(config).run()
    finally:
        keeper.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
