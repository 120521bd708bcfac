"""Where dcm may write: the one place every writer asks before it creates or replaces an output.

An :class:`Output` is checked when it is made (before any work) and again just
before the finished temporary is moved into place:

- it is never an input, never resolves to one (``..``, symbolic links, hard
  links), and never lies inside an input checkpoint directory unless it is a
  new file there; a directory output never contains an input, and is never the
  current directory or one of its parents;
- an existing output is replaced only with ``overwrite``, and then only a
  regular file or a directory that dcm wrote (it holds :data:`MARKER`, which
  lists every file in it);
- the final rename never replaces something that appeared while dcm was
  working (``renameat2(RENAME_NOREPLACE)``, else ``link`` + ``unlink``);
- temporaries sit beside the output, named ``.<OUT>.dcm-tmp-<PID>-…``, so a run
  killed outright (SIGKILL) leaves names the next run on the same output can
  recognise and remove once their process is gone;
- operating-system errors on the output side become :class:`OutputError`,
  naming the path the user gave, not a temporary.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import warnings

from .errors import DcmWarning, OutputError, OutputExistsError, UnsafeOutputError

MARKER = ".dcm-output.json"  # in every directory dcm writes; hidden, so never carried as an attachment
_TMP_TAG = ".dcm-tmp-"
_MAX_STEM = 128  # bytes of the output's name kept in a temporary's name (NAME_MAX is 255)
_MAX_SCAN = 100_000  # files of an input directory looked at for hard links
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


# --- the final rename ------------------------------------------------------------------


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (musl, macOS...)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, never replacing it."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # else: the filesystem lacks the flag
            raise OSError(err, os.strerror(err), src, None, dst)
    if not os.path.isdir(src):
        try:
            os.link(src, dst)  # fails with EEXIST, atomically
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links here (some network and FUSE filesystems): the portable check below
        else:
            os.unlink(src)
            return
    # A directory (or a filesystem without links): rename() still refuses a non-empty directory
    # and a file over a directory; only an empty directory or a file appearing in this instant is lost.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


# --- inputs ------------------------------------------------------------------------------


def _within(path: str, folder: str) -> bool:
    """``path`` lies strictly inside ``folder`` (both resolved)."""
    folder = folder.rstrip(os.sep) + os.sep
    return path.startswith(folder) and path != folder.rstrip(os.sep)


def _file_id(st) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Input:
    def __init__(self, role: str, path):
        self.role, self.given = role, os.fspath(path)
        self.real = os.path.realpath(self.given)
        try:
            st = os.stat(self.given)
        except OSError:  # the reader reports a missing input; nothing to protect here
            st = None
        self.is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        self.id = None if st is None else _file_id(st)
        self._ids = None

    def describe(self) -> str:
        return f"the {self.role} {self.given}"

    def file_ids(self) -> set:
        """(st_dev, st_ino) of this input's files (links followed), to catch hard links."""
        if self._ids is None:
            self._ids = {self.id} if self.id is not None else set()
            if self.is_dir:
                seen = 0
                for folder, _, files in os.walk(self.given):
                    for name in files:
                        with contextlib.suppress(OSError):
                            self._ids.add(_file_id(os.stat(os.path.join(folder, name))))
                        seen += 1
                    if seen > _MAX_SCAN:
                        break
        return self._ids


def _inputs(inputs) -> list[_Input]:
    if not inputs:
        return []
    pairs = inputs.items() if isinstance(inputs, dict) else inputs
    return [_Input(role, path) for role, path in pairs if path is not None]


# --- dcm output directories ------------------------------------------------------------


def _tree(folder: str) -> list[str]:
    """Every file and link under ``folder`` as relative POSIX paths (directories implied)."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(out)


def write_marker(folder, files, written_by: str) -> None:
    """Mark ``folder`` as a dcm output listing ``files`` (its relative paths), so --overwrite may replace it."""
    text = json.dumps({"written_by": written_by, "files": sorted(files)}, indent=1) + "\n"
    with open(os.path.join(folder, MARKER), "x", encoding="utf-8") as f:
        f.write(text)


def foreign_files(folder: str) -> list[str] | None:
    """Files in a directory that dcm did not write; None when it carries no readable marker."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            listed = json.load(f)["files"]
        if not isinstance(listed, list):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    known = set(listed) | {MARKER}
    return [p for p in _tree(folder) if p not in known]


# --- the output ----------------------------------------------------------------------------


class Output:
    """One output path (``kind`` "file" or "dir"), checked against the ``inputs`` ({role: path}).

    Raises UnsafeOutputError or OutputExistsError (exit 2) if dcm may not write
    there, OutputError (its own exit code) if the folder to write in is missing.
    """

    def __init__(self, path, *, kind: str, inputs=None, overwrite: bool = False):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise UnsafeOutputError(f"output must be a path (str or os.PathLike), got {type(path).__name__}")
        self.given = os.fsdecode(os.fspath(path))
        self.path = os.path.abspath(self.given)
        self.folder, self.name = os.path.split(self.path)
        self.kind, self.overwrite = kind, overwrite
        self.inputs = _inputs(inputs)
        self.check()
        self.remove_stale()

    # --- checks ---

    def _refuse(self, reason: str):
        raise UnsafeOutputError(f"refusing to write {self.given}: {reason}")

    def check(self, *, final: bool = False) -> None:
        """Raise unless dcm may write the output now (``final``: just before the rename)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OutputError(f"{self.given}: cannot use the output: {e.strerror}") from e
        self._check_inputs(st)
        if self.kind == "dir" and not self.name or self._is_cwd_or_parent():
            self._refuse("it is the current directory or one of its parents")
        if st is None:
            if not os.path.isdir(self.folder):
                raise OutputError(f"{self.given}: output directory {self.folder} does not exist")
            return
        self._check_existing(st, final)

    def _check_inputs(self, st) -> None:
        real = os.path.realpath(self.path)
        for inp in self.inputs:
            if real == inp.real or (st is not None and inp.id == _file_id(st)):
                self._refuse(f"it is {inp.describe()}")
            if self.kind == "dir" and _within(inp.real, real):
                self._refuse(f"it contains {inp.describe()}")
        if st is None:
            return
        for inp in self.inputs:
            if inp.is_dir and os.path.exists(self.path) and _file_id(os.stat(self.path)) in inp.file_ids():
                link = "" if _within(real, inp.real) else "a hard link to "
                self._refuse(f"it is {link}a file of {inp.describe()}")
            if inp.is_dir and _within(real, inp.real):
                self._refuse(f"it lies inside {inp.describe()}: dcm writes only new files there")

    def _is_cwd_or_parent(self) -> bool:
        if self.kind != "dir":
            return False
        try:
            cwd = os.path.realpath(os.getcwd())
        except OSError:
            return False
        real = os.path.realpath(self.path)
        return cwd == real or _within(cwd, real)

    def _check_existing(self, st, final: bool) -> None:
        mode = st.st_mode
        if self.kind == "dir" and stat.S_ISDIR(mode) and not os.listdir(self.path):
            return  # an empty directory is taken as it is
        if not self.overwrite:
            if final:
                raise OutputExistsError(f"{self.given} appeared while dcm was writing it (another process?); "
                                        f"nothing was replaced; --overwrite replaces it")
            what = "exists" if self.kind == "file" else "exists and is not an empty directory"
            raise OutputExistsError(f"{self.given} {what}; --overwrite replaces it")
        if stat.S_ISREG(mode):
            return
        if self.kind == "dir" and stat.S_ISDIR(mode):
            foreign = foreign_files(self.path)
            if foreign is None:
                self._refuse(f"it is a directory dcm did not write (no {MARKER}); --overwrite replaces only "
                             f"a regular file or a directory written by dcm")
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                self._refuse(f"it holds files dcm did not write ({shown}); remove them or choose another path")
            return
        self._refuse(f"it is {_kind_of(mode)}; --overwrite replaces only a regular file"
                     + (" or a directory written by dcm" if self.kind == "dir" else ""))

    # --- temporaries ---

    def _prefix(self) -> str:
        stem = os.fsencode(self.name)[:_MAX_STEM].decode("utf-8", "ignore") or "dcm"
        return f".{stem}{_TMP_TAG}"

    def temp_file(self, label: str) -> tuple[int, str]:
        """(fd, path) of a new temporary file beside the output, opened for writing."""
        with self.errors():
            return tempfile.mkstemp(dir=self.folder, prefix=f"{self._prefix()}{os.getpid()}-{label}-")

    def temp_dir(self, label: str) -> str:
        with self.errors():
            return tempfile.mkdtemp(dir=self.folder, prefix=f"{self._prefix()}{os.getpid()}-{label}-")

    def remove_stale(self) -> None:
        """Remove temporaries of this output left by dcm processes that are gone (killed outright)."""
        pattern = re.compile(re.escape(self._prefix()) + r"([0-9]+)-")
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            m = pattern.match(name)
            if m is None or _alive(int(m.group(1))):
                continue
            path = os.path.join(self.folder, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError:
                continue
            warnings.warn(f"removed {path}: a temporary of an earlier dcm run (process {m.group(1)}) "
                          f"that did not finish", DcmWarning, stacklevel=2)

    # --- finishing ---

    def place(self, tmp: str) -> None:
        """Move the finished temporary ``tmp`` to the output, checking everything again first."""
        self.check(final=True)
        with self.errors():
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                st = None
            if st is None:
                self._rename_new(tmp)
            elif stat.S_ISDIR(st.st_mode) and self.kind == "dir" and not os.listdir(self.path):
                os.rmdir(self.path)
                self._rename_new(tmp)
            elif stat.S_ISREG(st.st_mode) and self.kind == "file":
                os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
            else:
                self._replace_aside(tmp, st)

    def _rename_new(self, tmp: str) -> None:
        try:
            rename_noreplace(tmp, self.path)
        except FileExistsError as e:
            raise OutputExistsError(f"{self.given} appeared while dcm was writing it (another process?); "
                                    f"nothing was replaced; --overwrite replaces it") from e
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise OutputExistsError(f"{self.given} appeared while dcm was writing it (another process?); "
                                        f"nothing was replaced") from e
            raise

    def _replace_aside(self, tmp: str, st) -> None:
        """Replace a directory (or a file by a directory): move the old one aside, the new one in."""
        aside = self.temp_dir("old")
        old = os.path.join(aside, "old")
        os.rename(self.path, old)
        try:
            self._rename_new(tmp)
        except BaseException:
            try:
                rename_noreplace(old, self.path)  # put the old output back
                os.rmdir(aside)
            except OSError:
                warnings.warn(f"the previous {self.given} is left at {old}", DcmWarning, stacklevel=2)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    @contextlib.contextmanager
    def errors(self):
        """Operating-system errors inside become OutputError naming the output the user gave."""
        try:
            yield
        except OSError as e:
            raise OutputError(f"{self.given}: cannot write: {e.strerror or e}") from e


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or not ours to judge: leave it
    return True
