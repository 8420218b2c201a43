"""A second held-out retrieval set: 38 Debian manual pages (coreutils, grep, sed, tar, gzip, make, diff, ssh...).

Why a second one: tests/support/rag_heldout.py (Python's pydoc topics) was looked at while retrieval was tuned
(issue 15, item 5), so a change that helps there may only fit those 30 questions. This set is another kind of text
(option lists and terse descriptions under all-caps section names, rendered by ``man``) and was built by helper H8b
as follows: **the 30 questions below and their answer phrases were written and saved before any retrieval was run
over these pages**, from reading the rendered text only; they are fixed, do not edit them to match results.

Each question names its page and ``answer``, a short verbatim phrase of the passage that holds the answer; as in the
pydoc set, any page that contains the phrase is a right document, and a hit is the right passage when its text
contains the phrase (whitespace collapsed). The pages are rendered on this machine (``man --nh --nj -P cat -l``,
80 columns, UTF-8), so they need ``man`` and the Debian packages that own them (coreutils, grep, sed, tar, gzip,
make, diffutils, procps, openssh-client, util-linux, manpages); :func:`corpus` says which page is missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from app.store.rag import RagStore, SearchMode
from tests.support.rag_heldout import (
    HeldOutQuestion,
    HeldOutScore,
    documents_holding,
    score_questions,
    upload,
)

MAN_ROOT = Path("/usr/share/man")
PAGES: tuple[str, ...] = (
    "man1/tar.1", "man1/gzip.1", "man1/sort.1", "man1/uniq.1", "man1/cut.1", "man1/head.1", "man1/tail.1",
    "man1/du.1", "man1/df.1", "man1/ln.1", "man1/touch.1", "man1/date.1", "man1/kill.1", "man1/nice.1",
    "man1/timeout.1", "man1/tee.1", "man1/wc.1", "man1/xargs.1", "man1/split.1", "man1/ssh.1", "man1/scp.1",
    "man1/cp.1", "man1/mv.1", "man1/rm.1", "man1/chmod.1", "man1/ls.1", "man1/grep.1", "man1/sed.1",
    "man1/make.1", "man1/diff.1", "man1/nohup.1", "man1/watch.1", "man1/mkdir.1", "man1/env.1",
    "man5/ssh_config.5", "man5/passwd.5", "man5/fstab.5", "man5/hosts.5",
)  # fmt: skip

# Written and saved before any retrieval over these pages was run (see the module docstring).
QUESTIONS: tuple[HeldOutQuestion, ...] = (
    HeldOutQuestion("What exit code does timeout return when the command ran too long?", "timeout.1",
                    "124 if COMMAND times out"),
    HeldOutQuestion("Where does the output go when I run a command with nohup from a terminal?", "nohup.1",
                    "append output to 'nohup.out'"),
    HeldOutQuestion("How do I keep printing new lines as a log file grows?", "tail.1",
                    "output appended data as the file grows"),
    HeldOutQuestion("Why doesn't uniq remove duplicate lines that are far apart in the file?", "uniq.1",
                    "does not detect repeated lines unless they are adjacent"),
    HeldOutQuestion("How can I see how many inodes are free on each file system?", "df.1",
                    "list inode information instead of block usage"),
    HeldOutQuestion("Will rm refuse to delete the root directory recursively?", "rm.1",
                    "do not remove '/' (default)"),
    HeldOutQuestion("What does the sticky bit do on a shared directory like /tmp?", "chmod.1",
                    "prevents unprivileged users from removing or renaming a file in the directory"),
    HeldOutQuestion("What range of priority values can a process be given, and which is the most favourable?",
                    "nice.1", "range from -20 (most favorable to the process) to 19"),
    HeldOutQuestion("How do I pass file names that contain spaces safely from find to xargs?", "xargs.1",
                    "Input items are terminated by a null character instead of by whitespace"),
    HeldOutQuestion("How do I make sed change the file itself and keep a backup copy?", "sed.1",
                    "edit files in place (makes backup if SUFFIX supplied)"),
    HeldOutQuestion("Can gzip compress a file without deleting the original?", "gzip.1",
                    "Keep (don't delete) input files during compression"),
    HeldOutQuestion("How do I reach a server that is only accessible through a bastion host?", "ssh.1",
                    "first making a ssh connection to the jump host"),
    HeldOutQuestion("How do I forward a port on my laptop to a service on the remote network?", "ssh.1",
                    "connections to the given TCP port or Unix socket on the local (client) host are to be forwarded"),
    HeldOutQuestion("How do I build with several compile commands running at the same time?", "make.1",
                    "Specifies the number of jobs (commands) to run simultaneously"),
    HeldOutQuestion("How long until ssh drops a connection when the server stops answering keepalive messages?",
                    "ssh_config.5", "ssh will disconnect after approximately 45 seconds"),
    HeldOutQuestion("In which order are file systems checked at boot, and what number should the root file system get?",
                    "fstab.5", "The root filesystem should be specified with a fs_passno of 1"),
    HeldOutQuestion("What does an x in the password field of /etc/passwd mean?", "passwd.5",
                    "the encrypted password is actually stored in the shadow(5) file"),
    HeldOutQuestion("How is a locked account marked in the password file?", "passwd.5",
                    "starts with an exclamation mark means that the password is locked"),
    HeldOutQuestion("How do I convert a Unix timestamp into a readable date?", "date.1",
                    "Convert seconds since the Epoch (1970-01-01 UTC) to a date"),
    HeldOutQuestion("How do I create a nested directory path without an error if it already exists?", "mkdir.1",
                    "no error if existing, make parent directories as needed"),
    HeldOutQuestion("Which signal does kill send when I don't name one?", "kill.1",
                    "The default signal for kill is TERM"),
    HeldOutQuestion("How do I add to a file with tee instead of overwriting it?", "tee.1",
                    "append to the given FILEs, do not overwrite"),
    HeldOutQuestion("How is a relative symbolic link's target resolved?", "ln.1",
                    "a relative link is interpreted in relation to its parent directory"),
    HeldOutQuestion("What exit status does diff give when the files differ?", "diff.1",
                    "Exit status is 0 if inputs are the same, 1 if different, 2 if trouble"),
    HeldOutQuestion("Can make continue building other targets after one fails?", "make.1",
                    "Continue as much as possible after an error"),
    HeldOutQuestion("What does grep's exit status mean when nothing matched?", "grep.1",
                    "1 if no lines were selected"),
    HeldOutQuestion("How can watch highlight what changed between refreshes?", "watch.1",
                    "Highlight the differences between successive updates"),
    HeldOutQuestion("How do I extract a tar archive into a different directory?", "tar.1",
                    "Change to DIR before performing any operations"),
    HeldOutQuestion("How do I stop du from counting mounted drives under a directory?", "du.1",
                    "skip directories on different file systems"),
    HeldOutQuestion("How do I sort sizes like 2K and 1G in the right order?", "sort.1",
                    "compare human readable numbers (e.g., 2K 1G)"),
)  # fmt: skip

class ManPagesMissing(RuntimeError):
    """``man`` or one of the pages is not on this machine."""


@functools.cache
def corpus() -> dict[str, str]:
    """``<page>.<section>.txt`` → the page as ``man`` prints it to a pipe (no hyphenation, no justification)."""
    return render(PAGES)


def render(pages: Sequence[str]) -> dict[str, str]:
    """Render ``pages`` (``man1/tar.1``...) as :func:`corpus` does; shared with tests/support/rag_dev_man.py."""
    if shutil.which("man") is None:
        raise ManPagesMissing("the man-db package (the man command) is not installed")
    environment = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    environment.pop("MANPAGER", None)
    documents = {}
    for page in pages:
        path = MAN_ROOT / f"{page}.gz"
        if not path.exists():
            raise ManPagesMissing(f"{path} is not installed")
        rendered = subprocess.run(
            ["man", "--nh", "--nj", "-P", "cat", "-l", str(path)],
            capture_output=True, text=True, check=True, env=environment, timeout=60,
        )  # fmt: skip
        documents[f"{Path(page).name}.txt"] = rendered.stdout
    return documents


def answer_documents(documents: dict[str, str]) -> list[frozenset[str]]:
    """For each question, the pages that hold its answer phrase (fails loudly if a page's text changed)."""
    return documents_holding(QUESTIONS, documents, "the pages as rendered on this machine")


def load(store: RagStore, names: Sequence[str] | None = None) -> dict[str, str]:
    """Upload the pages (or only ``names``) as plain-text documents, as a user would."""
    return upload(store, corpus(), names)


def evaluate(
    store: RagStore,
    mode: SearchMode | None = None,
    k: int = 5,
    *,
    questions: Sequence[HeldOutQuestion] = QUESTIONS,
    min_relevance: float | None = None,
) -> HeldOutScore:
    holders = dict(zip(QUESTIONS, answer_documents(corpus()), strict=True))
    return score_questions(store, questions, holders, mode, k, min_relevance=min_relevance)
