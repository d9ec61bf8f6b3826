"""``delrec data upload`` and ``delrec store ...``: object-storage commands.

The endpoint comes from ``--endpoint`` or ``DELREC_S3_ENDPOINT``; credentials only from the
environment (``DELREC_S3_ACCESS_KEY`` / ``DELREC_S3_SECRET_KEY``, else ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``). TLS is on unless ``--insecure``,
``DELREC_S3_SECURE=0`` or an ``http://`` endpoint says otherwise (``--insecure`` with ``https://`` is
refused).
"""

from __future__ import annotations

import argparse
import json


def _store(args: argparse.Namespace):
    from delrec.store import S3Store

    return S3Store.from_env(args.endpoint, False if args.insecure else None)


def _upload(args: argparse.Namespace) -> None:
    from delrec.store import upload_dataset

    uri = upload_dataset(_store(args), args.dataset, args.source, args.to, replace=args.replace)
    print(uri)


def _ls(args: argparse.Namespace) -> None:
    for key in _store(args).list(args.uri):
        print(key)


def _get(args: argparse.Namespace) -> None:
    print(_store(args).fetch(args.uri, args.dest, force=args.force))


def _put(args: argparse.Namespace) -> None:
    from pathlib import Path

    store = _store(args)
    if Path(args.path).is_dir():
        store.put_dir(args.path, args.uri)
    else:
        store.put_file(args.path, args.uri)
    print(args.uri)


def _latest(args: argparse.Namespace) -> None:
    from delrec.store import LATEST, join_uri

    print(json.dumps(_store(args).get_json(join_uri(args.uri, LATEST)), indent=2))


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="host:port or URL of the S3 endpoint (default: $DELREC_S3_ENDPOINT)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (TLS is on by default)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data upload`` and ``store ls|get|put|latest``."""
    data = subparsers.add_parser("data", help="raw dataset utilities (upload to object storage)")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    up = data_sub.add_parser(
        "upload",
        help="upload a raw dataset to s3://bucket/prefix/DATASET/ (a preprocess --source)",
        description=(
            "Upload a raw dataset file or folder to TO/DATASET/ atomically and verified; prints the URI "
            "to give preprocess as its source. A TO/DATASET/ that already holds objects is refused "
            "unless --replace."
        ),
    )
    up.add_argument("--dataset", required=True, help="dataset name (ml-100k, beauty, steam ...)")
    up.add_argument("--source", required=True, help="local file or folder")
    up.add_argument("--to", required=True, help="s3://bucket/prefix")
    up.add_argument(
        "--replace", action="store_true", help="remove what an earlier upload left in TO/DATASET/ first"
    )
    _connection_args(up)
    up.set_defaults(handler=_upload)

    store = subparsers.add_parser("store", help="object storage: list, get, put, show the latest model")
    store_sub = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)
    ls = store_sub.add_parser("ls", help="list the keys under s3://bucket/prefix")
    ls.add_argument("uri", help="s3://bucket[/prefix]")
    ls.set_defaults(handler=_ls)
    get = store_sub.add_parser("get", help="download an object or a prefix (verified)")
    get.add_argument("uri", help="s3://bucket/key of an object, or a prefix")
    get.add_argument("dest", help="local folder (replaced only if empty or a delrec output)")
    get.add_argument("--force", action="store_true", help="replace DEST even if it is not a delrec output")
    get.set_defaults(handler=_get)
    put = store_sub.add_parser("put", help="upload a file or folder (atomic, verified)")
    put.add_argument("path", help="local file or folder")
    put.add_argument("uri", help="s3://bucket/key: the file's key, or the prefix a folder's files go under")
    put.set_defaults(handler=_put)
    latest = store_sub.add_parser("latest", help="show the latest published bundle of s3://bucket/PIPELINE")
    latest.add_argument("uri", help="s3://bucket[/prefix]/PIPELINE (where publish_to puts its bundles)")
    latest.set_defaults(handler=_latest)
    for p in (ls, get, put, latest):
        _connection_args(p)
