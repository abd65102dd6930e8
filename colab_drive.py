"""Google Drive in Colab: keep a run's checkpoints from filling the Drive quota.

    import colab_drive
    colab_drive.keep_tidy("/content/drive/MyDrive/agnews-bert")   # once, after drive.mount

train.py writes each checkpoint to a new file and renames it over the old one, so that a disconnect
mid-write never costs the last good checkpoint. On Drive the replaced file goes to the trash (and
a file rewritten in place keeps its old content as a revision); both count against the quota (15
GB on a free account) for 30 days, and a 3-epoch bert-base run saves its 1.3 GB last.pt 25 times.
keep_tidy permanently deletes, every 30 s, the trashed copies of that folder's best.pt and last.pt
(and their temporary files) and the old revisions of the live ones, through the Drive API: Colab
asks for permission once. Nothing else in the folder or the trash is touched.
"""
import threading
from pathlib import PurePosixPath

from common import UserError

CHECKPOINTS = ("best.pt", "last.pt")
FOLDER = "application/vnd.google-apps.folder"
MOUNTED = PurePosixPath("/content/drive/MyDrive")


def is_checkpoint(name):
    """best.pt, last.pt, or one of atomic_save's temporary files for them (.last.pt.x1y2.tmp)."""
    return name in CHECKPOINTS or any(
        name.startswith(f".{c}.") and name.endswith(".tmp") for c in CHECKPOINTS)


def search(service, query, fields="id, name"):
    """Every file of a Drive API query (all pages)."""
    files, page = [], None
    while True:
        found = service.files().list(q=query, fields=f"nextPageToken, files({fields})",
                                     pageToken=page).execute()
        files += found.get("files", [])
        page = found.get("nextPageToken")
        if not page:
            return files


def quoted(name):
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def folder_id(service, path):
    """/content/drive/MyDrive/a/b -> the Drive id of folder b."""
    try:
        names = PurePosixPath(path).relative_to(MOUNTED).parts
    except ValueError:
        raise UserError(f"{path}: not in Google Drive's folder {MOUNTED}") from None
    folder = "root"
    for name in names:
        found = search(service, f"name = {quoted(name)} and {quoted(folder)} in parents and "
                                f"mimeType = '{FOLDER}' and trashed = false")
        if not found:
            raise UserError(f"{path}: no folder {name!r} on Google Drive")
        folder = found[0]["id"]
    return folder


def tidy(service, folder):
    """Permanently delete the folder's trashed checkpoints and its live checkpoints' old revisions
    -> what was deleted, as names."""
    deleted = []
    for file in search(service, f"{quoted(folder)} in parents and trashed = true"):
        if is_checkpoint(file["name"]):
            service.files().delete(fileId=file["id"]).execute()  # not to the trash: gone
            deleted.append(file["name"])
    live = search(service, f"{quoted(folder)} in parents and trashed = false",
                  "id, name, headRevisionId")
    for file in live:
        if file["name"] not in CHECKPOINTS:
            continue
        revisions = service.revisions().list(fileId=file["id"], fields="revisions(id)").execute()
        for revision in revisions.get("revisions", []):
            if revision["id"] != file.get("headRevisionId"):  # the file's current content stays
                service.revisions().delete(fileId=file["id"], revisionId=revision["id"]).execute()
                deleted.append(f"{file['name']} (an old revision)")
    return deleted


def keep_tidy(path, every_s=30):
    """In Colab, after drive.mount: tidy() the Drive folder at path now and every every_s seconds,
    in a background thread, for as long as the runtime lives -> an Event: .set() stops it."""
    from google.colab import auth
    from googleapiclient.discovery import build

    auth.authenticate_user()  # Colab's prompt: lets this notebook use the Drive API as you
    service = build("drive", "v3")
    stop = threading.Event()

    def loop():
        folder, said = None, None
        while True:
            # Whatever fails (the network, a quota, a folder just made on the mount that has not
            # reached Drive yet) is tried again next round.
            try:
                folder = folder or folder_id(service, path)
                tidy(service, folder)
            except (Exception, UserError) as err:  # noqa: BLE001
                message = f"colab_drive: could not tidy {path} ({err})"
                if message != said:  # once, not every round
                    print(message)
                said = message
            if stop.wait(every_s):
                return
    threading.Thread(target=loop, daemon=True, name="colab_drive").start()
    return stop
