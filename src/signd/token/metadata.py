"""Key records on the token: each revision of a key's record is a
``CKO_DATA`` object (application ``signd``, label the key's name, value the
revision as 8 bytes and the record).  Part of ``TokenSession``, which
provides the session; worker side."""

from __future__ import annotations

import logging
from typing import Any, Final

from pkcs11 import Attribute, ObjectClass

from .ipc import MetadataBlob
from .profiles import Profile

__all__ = ["APPLICATION", "MetadataObjects"]

log = logging.getLogger("signd.token")

APPLICATION: Final = "signd"


class MetadataObjects:
    """The key records' operations of ``TokenSession``."""

    _profile: Profile
    _created: Any

    def _session_or_raise(self) -> Any:
        raise NotImplementedError  # TokenSession's

    def load_metadata(self, name: str | None) -> list[MetadataBlob]:
        """The newest metadata revision of one key, or of every key."""
        session = self._session_or_raise()
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
        }
        if name is not None:
            template[Attribute.LABEL] = name
        newest: dict[str, MetadataBlob] = {}
        for obj in session.get_objects(template):
            blob = _parse_blob(obj[Attribute.LABEL], obj[Attribute.VALUE])
            if blob is None:
                log.warning("ignoring a signd data object with an unreadable value")
                continue
            cur = newest.get(blob.name)
            if cur is None or blob.revision > cur.revision:
                newest[blob.name] = blob
        return sorted(newest.values(), key=lambda b: b.name)

    # Writing a record is three steps, each a call, so that the checks between
    # them can be made by a process that never writes (see ``keys/recordstore.py``).

    def revisions(self, name: str) -> list[int]:
        """The revisions of a key's record on the token (normally one)."""
        return [b.revision for _, b in self._metadata_objects(name)]

    def create_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Store revision ``revision`` of a key's record; ``drop_created`` takes it back."""
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.APPLICATION: APPLICATION,
            Attribute.LABEL: name,
            Attribute.VALUE: revision.to_bytes(8, "big") + value,
        }
        if self._profile.standard_records:
            template[Attribute.PRIVATE] = True
            template[Attribute.MODIFIABLE] = False
        else:  # YubiHSM: no CKA_MODIFIABLE, CKA_PRIVATE false; objects need a login anyway
            template[Attribute.PRIVATE] = False
        self._created = self._session_or_raise().create_object(template)

    def drop_created(self) -> None:
        if self._created is not None:
            self._created.destroy()
            self._created = None

    def drop_older(self, name: str, revision: int) -> None:
        """Delete the revisions of a key's record older than ``revision``."""
        self._created = None
        for obj, blob in self._metadata_objects(name):
            if blob.revision < revision:
                obj.destroy()

    def _metadata_objects(self, name: str) -> list[tuple[Any, MetadataBlob]]:
        template = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
            Attribute.LABEL: name,
        }
        out = []
        for obj in self._session_or_raise().get_objects(template):
            blob = _parse_blob(name, obj[Attribute.VALUE])
            if blob is not None:
                out.append((obj, blob))
        return out


def _parse_blob(label: str, value: bytes) -> MetadataBlob | None:
    if len(value) < 8:
        return None
    return MetadataBlob(label, int.from_bytes(value[:8], "big"), bytes(value[8:]))
