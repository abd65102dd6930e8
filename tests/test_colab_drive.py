"""colab_drive against an in-memory Drive that answers the API calls it makes (no Colab, no
network): it deletes the trashed checkpoints of its own folder and their old revisions, and
nothing else."""
import re
import sys
import time
import types

import pytest

import colab_drive
from common import UserError

FOLDER = "application/vnd.google-apps.folder"


class Call:
    def __init__(self, result=None):
        self.result = result

    def execute(self):
        return self.result


class FakeDrive:
    """files().list/delete and revisions().list/delete over a list of dicts (id, name, parents,
    mimeType, trashed, and for files revisions + headRevisionId). list pages 2 files at a time."""

    def __init__(self, items):
        self.items = items

    def files(self):
        return self

    def revisions(self):
        return Revisions(self)

    @staticmethod
    def matches(item, clause):
        for pattern, check in [
                (r"name = '(.*)'", lambda v: item["name"] == v),
                (r"'(.*)' in parents", lambda v: v in item["parents"]),
                (r"mimeType = '(.*)'", lambda v: item.get("mimeType") == v),
                (r"trashed = (true|false)", lambda v: item["trashed"] == (v == "true"))]:
            found = re.fullmatch(pattern, clause)
            if found:
                return check(found.group(1))
        raise AssertionError(f"a query the fake does not know: {clause!r}")

    def list(self, q, fields, pageToken=None):
        found = [i for i in self.items if all(self.matches(i, c) for c in q.split(" and "))]
        start = int(pageToken or 0)
        page = {"files": [dict(i) for i in found[start : start + 2]]}
        if start + 2 < len(found):
            page["nextPageToken"] = str(start + 2)
        return Call(page)

    def delete(self, fileId):
        self.items = [i for i in self.items if i["id"] != fileId]
        return Call()

    def by_id(self, file_id):
        return next(i for i in self.items if i["id"] == file_id)


class Revisions:
    def __init__(self, drive):
        self.drive = drive

    def list(self, fileId, fields):
        return Call({"revisions": [{"id": r} for r in self.drive.by_id(fileId)["revisions"]]})

    def delete(self, fileId, revisionId):
        self.drive.by_id(fileId)["revisions"].remove(revisionId)
        return Call()


def a_drive():
    def item(id_, name, parent, trashed=False, **more):
        return {"id": id_, "name": name, "parents": [parent], "trashed": trashed, **more}
    return FakeDrive([
        item("old", "agnews-bert", "root", trashed=True, mimeType=FOLDER),  # not this one
        item("run", "agnews-bert", "root", mimeType=FOLDER),
        item("other", "other", "root", mimeType=FOLDER),
        item("best", "best.pt", "run", revisions=["b1", "b2"], headRevisionId="b2"),
        item("last", "last.pt", "run", revisions=["l1", "l2", "l3"], headRevisionId="l3"),
        item("log", "metrics.jsonl", "run", revisions=["m1", "m2"], headRevisionId="m2"),
        item("t1", "last.pt", "run", trashed=True),
        item("t2", "last.pt", "run", trashed=True),
        item("t3", "best.pt", "run", trashed=True),
        item("t4", ".last.pt.k2j4x8.tmp", "run", trashed=True),
        item("t5", "notes.txt", "run", trashed=True),  # the user's: kept
        item("t6", "last.pt", "other", trashed=True),  # another folder's: kept
    ])


def test_tidy_deletes_the_folders_replaced_checkpoints_and_nothing_else():
    drive = a_drive()
    folder = colab_drive.folder_id(drive, "/content/drive/MyDrive/agnews-bert")
    assert folder == "run"
    deleted = colab_drive.tidy(drive, folder)
    assert sorted(deleted) == sorted(["last.pt", "last.pt", "best.pt", ".last.pt.k2j4x8.tmp",
                                      "best.pt (an old revision)", "last.pt (an old revision)",
                                      "last.pt (an old revision)"])
    assert {i["id"] for i in drive.items if i["trashed"]} == {"old", "t5", "t6"}
    assert [drive.by_id(f)["revisions"] for f in ("best", "last", "log")] == [
        ["b2"], ["l3"], ["m1", "m2"]]
    assert colab_drive.tidy(drive, folder) == []  # and then there is nothing left to do


def test_a_folder_not_on_drive_is_a_clear_error():
    with pytest.raises(UserError, match="no folder 'missing' on Google Drive"):
        colab_drive.folder_id(a_drive(), "/content/drive/MyDrive/agnews-bert/missing")
    with pytest.raises(UserError, match="runs/agnews: not in Google Drive's folder"):
        colab_drive.folder_id(a_drive(), "runs/agnews")


def test_keep_tidy_authenticates_once_then_tidies_in_the_background(monkeypatch, capsys):
    drive, logins = a_drive(), []
    # the folder, just made on the mount, is not on Drive yet: found a few rounds later
    folder = next(i for i in drive.items if i["id"] == "run")
    drive.items.remove(folder)
    colab = types.ModuleType("google.colab")
    colab.auth = types.SimpleNamespace(authenticate_user=lambda: logins.append(1))
    discovery = types.ModuleType("googleapiclient.discovery")
    discovery.build = lambda api, version: drive if (api, version) == ("drive", "v3") else None
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "googleapiclient", types.ModuleType("googleapiclient"))
    monkeypatch.setitem(sys.modules, "googleapiclient.discovery", discovery)
    stop = colab_drive.keep_tidy("/content/drive/MyDrive/agnews-bert", every_s=0.05)
    time.sleep(0.3)
    assert any(i["id"] == "t1" for i in drive.items)
    drive.items.append(folder)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(i["id"] == "t1" for i in drive.items):
        time.sleep(0.02)
    assert logins == [1] and not any(i["id"] == "t1" for i in drive.items)
    drive.items.append({"id": "t7", "name": "last.pt", "parents": ["run"], "trashed": True})
    while time.monotonic() < deadline and any(i["id"] == "t7" for i in drive.items):
        time.sleep(0.02)
    assert not any(i["id"] == "t7" for i in drive.items)  # a later replacement: gone as well
    stop.set()
    assert capsys.readouterr().out.count("no folder 'agnews-bert' on Google Drive") == 1  # once
