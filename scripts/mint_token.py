"""Mint a connection token for trying the bridge's per-user access (HS256 with JWT_SECRET).

    JWT_SECRET=... .venv/bin/python scripts/mint_token.py alice
    JWT_SECRET=... .venv/bin/python scripts/mint_token.py alice --ttl 600 --sub-allow 'user.{sub}.orders.>'

Prints the token.  For real deployments, tokens come from your own auth
service; this is for tests and demos.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jwt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/mint_token.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sub", help="the user: one subject token, e.g. alice")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until exp (default 3600)")
    parser.add_argument("--secret", default=os.environ.get("JWT_SECRET"), help="default: $JWT_SECRET")
    parser.add_argument("--aud", help="aud claim (JWT_AUDIENCE)")
    parser.add_argument("--iss", help="iss claim (JWT_ISSUER)")
    for kind in ("sub", "pub"):
        for verb in ("allow", "deny"):
            parser.add_argument(f"--{kind}-{verb}", action="append", metavar="PATTERN",
                                help=f"nats.{kind}.{verb} pattern ({{sub}} allowed); repeatable")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("no secret: set JWT_SECRET or pass --secret")
    now = int(time.time())
    payload: dict = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if args.aud:
        payload["aud"] = args.aud
    if args.iss:
        payload["iss"] = args.iss
    nats: dict = {}
    for kind in ("sub", "pub"):
        for verb in ("allow", "deny"):
            patterns = getattr(args, f"{kind}_{verb}")
            if patterns:
                nats.setdefault(kind, {})[verb] = patterns
    if nats:
        payload["nats"] = nats
    print(jwt.encode(payload, args.secret, algorithm="HS256"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
