"""Binding the daemon's unix sockets, in a directory checked to be the daemon's own.

``bind_socket(path)`` binds ``path`` (mode 0660: readers reach it through the daemon's group) inside its
directory as opened and checked once: owned by the daemon's uid, writable by nobody else, never reached
through a symlink. The unlink of a socket a killed daemon left, the bind and the chmod all go through that
one directory descriptor, so a directory swapped in on the way (through a writable parent higher up) is
refused, not written into. Raises UntrustedCacheDir, naming the directory, when it is not the daemon's.
The caller holds the cache dir's lock, so the socket being replaced is never a live daemon's.
"""

from __future__ import annotations

import os
import socket
import stat

from s3cache.errors import UntrustedCacheDir


def bind_socket(path: str) -> socket.socket:
    """Bind ``path`` (mode 0660) inside its directory as opened and checked once: the daemon's own,
    written by nobody else, never through a symlink; the unlink, bind and chmod all go through that
    descriptor, so a directory swapped in on the way (a writable parent higher up) is refused, not
    written into."""
    parent, name = os.path.split(path)
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise UntrustedCacheDir(f"cannot open {parent} for the daemon's sockets without following a "
                                f"symlink: {e.strerror}") from None
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedCacheDir(f"{parent} is not the daemon's own directory (owner uid {st.st_uid}, mode "
                                    f"{stat.S_IMODE(st.st_mode):04o}): not binding its sockets there")
        try:
            os.unlink(name, dir_fd=dfd)  # a socket left by a killed daemon; we hold the cache lock
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        via = f"/proc/self/fd/{dfd}/{name}"  # the checked directory itself, whatever the path says now
        old = os.umask(0o117)
        try:
            s.bind(via if os.path.isdir(f"/proc/self/fd/{dfd}") else path)
        finally:
            os.umask(old)
        os.chmod(name, 0o660, dir_fd=dfd)
        return s
    finally:
        os.close(dfd)
