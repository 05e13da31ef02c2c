"""botocore's data, loaded for a session that makes S3 clients only: what start-up spent most of the S3
client's creation on.

botocore's ``Loader``, to build a client of one service, lists every service it has data for (~400
directories, once per kind of model: ~10 ms) and decodes ``endpoints.json`` whole (1.2 MB, every
service of every partition: ~14 ms), of which an S3 client reads each partition's head and its
``s3`` entry. ``S3Loader`` checks S3's directory alone, and decodes those parts of the file alone
(``s3_endpoints``), falling back to the whole file when it is not laid out as botocore ships it.

Invariant: an S3 client built with it resolves endpoints exactly as with botocore's loader (the same
partitions, regions and S3 entries: tests/test_startup_cost.py compares the two); AWS_DATA_PATH is
honoured as botocore does; a session using it answers that S3 is its only service.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import OrderedDict

import botocore.exceptions
import botocore.loaders

# How botocore's endpoints.json is laid out (its generator's pretty printer, "key" : value, two spaces a
# level): the partitions array's items, a partition's services (its last key), and one service's entry.
_PARTITIONS = '{\n  "partitions" : [ {\n'
_NEXT_PARTITION = "\n  }, {\n"
_SERVICES = '\n    "services" : {\n'
_S3 = '      "s3" : {'
_ENTRY_END = "\n      }"  # a service's closing brace: every line inside it is indented deeper
_SERVICES_END = "\n    }"


def s3_endpoints(text: str) -> OrderedDict | None:
    """``endpoints.json`` (its ``text``) with every partition's services cut to ``s3``, decoding only the
    partitions' heads and S3's entries; None when the text is not laid out as expected (or a partition
    has no S3 entry), for the caller to decode it whole. Searches by index, copying no more than it
    decodes."""
    end = text.rfind("\n  } ],\n")
    if not text.startswith(_PARTITIONS) or end < 0:
        return None
    partitions = []
    at = len(_PARTITIONS)
    while at < end:
        stop = text.find(_NEXT_PARTITION, at, end)
        stop = end if stop < 0 else stop
        services = text.find(_SERVICES, at, stop)
        if services < 0:
            return None
        first = services + len(_SERVICES)
        s3 = text.find(_S3, first, stop)
        if s3 < 0 or (s3 > first and text[s3 - 1] != "\n"):
            return None
        s3_end = text.find(_ENTRY_END, s3, stop)
        # Services must be the partition's last key: the first line back at its indent closes it, and
        # closes the partition too.
        if s3_end < 0 or text.find(_SERVICES_END, s3_end, stop) != stop - len(_SERVICES_END):
            return None
        try:
            partition = json.loads("{" + text[at:services] + '\n"services" : {' + text[s3:s3_end + len(_ENTRY_END)]
                                   + "}}", object_pairs_hook=OrderedDict)
        except ValueError:
            return None
        if not isinstance(partition.get("partition"), str) or list(partition["services"]) != ["s3"]:
            return None
        partitions.append(partition)
        at = stop + len(_NEXT_PARTITION)
    try:
        tail = json.loads("{" + text[end + len("\n  } ],"):], object_pairs_hook=OrderedDict)  # "version"
    except ValueError:
        return None
    doc = OrderedDict(partitions=partitions)
    doc.update(tail)
    return doc


class PlainJSON(botocore.loaders.JSONFileLoader):
    """botocore's model files (``NAME.json``, else ``NAME.json.gz``, as its own file loader looks) decoded
    into plain dicts, which keep their order as its OrderedDicts do: S3's service model is 1.4 MB of
    JSON, and the OrderedDict per object cost ~40% of its decoding (~3 ms of every start with the ruleset)."""

    def load_file(self, file_path: str):
        for ext in (".json", ".json.gz"):
            if os.path.isfile(file_path + ext):
                with open(file_path + ext, "rb") as f:
                    raw = f.read()
                return json.loads((gzip.decompress(raw) if ext == ".json.gz" else raw).decode("utf-8"))
        return None


class S3Loader(botocore.loaders.Loader):
    """botocore's data loader for a session that makes S3 clients only (see the module doc)."""

    @classmethod
    def create(cls, search_path: str | None) -> S3Loader:
        """As ``botocore.loaders.create_loader`` (``search_path``: AWS_DATA_PATH, ``os.pathsep``-separated)."""
        if search_path is None:
            return cls(file_loader=PlainJSON())
        return cls(extra_search_paths=[os.path.expanduser(os.path.expandvars(p))
                                       for p in search_path.split(os.pathsep)], file_loader=PlainJSON())

    def list_available_services(self, type_name: str) -> list[str]:
        try:
            self.determine_latest_version("s3", type_name)
        except botocore.exceptions.DataNotFoundError:
            return []
        return ["s3"]

    @botocore.loaders.instance_cache
    def load_data_with_path(self, name: str) -> tuple[object, str]:
        if name != "endpoints":
            return super().load_data_with_path(name)
        for path in self._potential_locations(name):
            if os.path.isfile(path + ".json"):
                with open(path + ".json", "rb") as f:
                    text = f.read().decode("utf-8")
                doc = s3_endpoints(text)
                return (doc if doc is not None else json.loads(text, object_pairs_hook=OrderedDict)), path
            if self.file_loader.exists(path):  # another form (compressed): botocore's way
                return super().load_data_with_path(name)
        raise botocore.exceptions.DataNotFoundError(data_path=name)
