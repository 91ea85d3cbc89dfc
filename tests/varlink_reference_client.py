#!/usr/bin/env python3
"""A guest's whole lifecycle through the `varlink` package (PyPI), the
reference Python client, against a real vtpmd.

Usage: varlink_reference_client.py SOCKET GUEST OTHER_GUEST

Only the package's own Client, interface handlers, IDL parser and error
classes speak to the daemon: nothing here writes or reads the wire itself.
The package checks every reply against the interface description it parsed
from GetInterfaceDescription (types, enum values), so a reply that does not
match vtpmd's own IDL fails the call. Prints one JSON object of what it saw
on stdout; tests/varlink_python.rs checks it. Any exception fails the run
(non-zero exit, traceback on stderr).
"""

import base64
import importlib.metadata
import json
import queue
import sys
import threading

import varlink

PASS = b"correct horse battery staple"
NEW_PASS = b"a new passphrase"
INTERFACE = "io.vtpmd.Manager"


def b64(secret):
    """Secrets travel as the standard base64 of their bytes."""
    return base64.b64encode(secret).decode("ascii")


def expect_error(call, **kwargs):
    """Runs call(**kwargs), which must fail; returns the package's view of the
    error: its class, Varlink name and parameters."""
    try:
        call(**kwargs)
    except varlink.VarlinkError as e:
        return {"class": type(e).__name__, "error": e.error(), "parameters": e.parameters()}
    raise AssertionError(f"{call.__name__}({kwargs}) succeeded")


def monitor(client, events, subscribed):
    """Reads Monitor's stream (a call with `more`) on its own connection."""
    with client.open(INTERFACE) as mon:
        for reply in mon.Monitor(_more=True):
            events.put(reply)
            subscribed.set()


def wait_event(events, kind, guest, seen):
    """Takes events off the stream until one of `kind` for `guest`."""
    while True:
        event = events.get(timeout=30)
        seen.append(event["event"])
        if event["event"] == kind and event["guest"]["guest"] == guest:
            return event


def main():
    socket_path, guest, other = sys.argv[1:4]
    out = {"package": importlib.metadata.version("varlink")}
    client = varlink.Client(address=f"unix:{socket_path}")

    # Introspection, and the package's IDL parser on what vtpmd serves.
    with client.open("org.varlink.service") as service:
        out["info"] = service.GetInfo()
        description = service.GetInterfaceDescription(interface=INTERFACE)["description"]
        parsed = varlink.Interface(description)
        out["interface_name"] = parsed.name
        out["methods"] = sorted(name for name, member in parsed.members.items() if hasattr(member, "in_type"))
        own = service.GetInterfaceDescription(interface="org.varlink.service")["description"]
        out["service_interface_name"] = varlink.Interface(own).name
        out["unknown_interface"] = expect_error(service.GetInterfaceDescription, interface="com.example.Nope")

    mgr = client.open(INTERFACE)
    out["capabilities"] = mgr.GetCapabilities()

    created = mgr.Create(guest=guest, version="2.0", model="tpm-crb", passphrase=b64(PASS))["guest"]
    out["created"] = {k: created[k] for k in ("guest", "version", "model", "state")}

    # Monitor from here on: its first reply is the guest that exists.
    events = queue.Queue()
    subscribed = threading.Event()
    threading.Thread(target=monitor, args=(client, events, subscribed), daemon=True).start()
    seen = []
    wait_event(events, "existing", guest, seen)

    started = mgr.Start(guest=guest, passphrase=b64(PASS))["guest"]
    out["started"] = {"state": started["state"], "has_ctrl_socket": bool(started.get("ctrl_socket"))}
    out["status"] = mgr.Status(guest=guest)["guest"]["state"]
    out["listed"] = [g["guest"] for g in mgr.List()["guests"]]
    running = wait_event(events, "running", guest, seen)
    out["running_event_has_start_timings"] = "start" in running

    # oneway: no reply is read, and the next call's reply is its own.
    mgr.List(_oneway=True)
    out["after_oneway"] = [g["guest"] for g in mgr.List()["guests"]]

    out["stopped"] = mgr.Stop(guest=guest)["guest"]["state"]
    wait_event(events, "stopped", guest, seen)

    out["rekeyed"] = mgr.Rekey(guest=guest, passphrase=b64(PASS), new_passphrase=b64(NEW_PASS))
    out["old_passphrase"] = expect_error(mgr.Start, guest=guest, passphrase=b64(PASS))
    out["restarted"] = mgr.Start(guest=guest, passphrase=b64(NEW_PASS))["guest"]["state"]
    mgr.Stop(guest=guest)

    out["deleted"] = mgr.Delete(guest=guest)
    wait_event(events, "deleted", guest, seen)
    out["events"] = seen

    # Errors as the package raises them.
    out["no_such_guest"] = expect_error(mgr.Status, guest=other)
    out["invalid_guest"] = expect_error(mgr.Status, guest="not-a-uuid")
    out["expected_more"] = expect_error(mgr.Monitor)
    out["listed_at_end"] = mgr.List()["guests"]
    mgr.close()

    json.dump(out, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
