"""The HTTP server's commands: serve, and hash-key (an API key's entry for serve --api-keys)."""

from __future__ import annotations

import sys


def cmd_serve(args) -> None:
    from mixllm_jax.serve import app, options

    app.run(options.config_from_args(args), debug=args.debug)


def cmd_hash_key(args) -> None:
    """Print the SHA-256 of an API key read from stdin (or of a new key with --generate) as a
    keys-file entry."""
    from mixllm_jax.serve import auth

    if args.generate:
        key = auth.new_key()
        print(f"key (give it to the client; it is not stored anywhere): {key}")
    else:
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline()
        key = key.strip()
        if not key:
            raise ValueError("no key given on stdin")
    print(f"- name: {args.name}\n  sha256: {auth.hash_key(key)}\n  roles: [{', '.join(args.roles)}]")
