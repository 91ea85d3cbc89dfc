#!/usr/bin/python3
"""An outside reader (and writer) of the vtpmd sealed-state format, versions 1 and 2.

Written from docs/sealed-format.md alone, step by step, with nothing of
vtpmd's code: if this file needs to know something the spec does not say,
the spec is what must be fixed. tests/outside_reader.rs runs it on files
the real daemon sealed and on damaged copies, and compares its verdicts
with `vtpmctl state verify`.

Needs argon2-cffi (Debian: python3-argon2) and cryptography
(python3-cryptography).

    outside_reader.py open FILE --guest UUID (--passphrase-file P | --key-file K
            | --host-key-file H) [--allow-weak]
        K holds the 32 raw bytes of a `key` slot's key; H is a vtpmd host key
        file (its "Host key file" layout). Prints one JSON object: {"verdict": ..., "step": N, "why": ...} and,
        when the verdict is "ok", "generation", "keyslot" (the index that
        opened), "swtpm_key_sha256" and "entries" (name, length, SHA-256 of
        each file's data, in archive order).

    outside_reader.py seal-archive FILE --guest UUID --passphrase-file P
            [--allow-weak] --archive A --out OUT
        Opens FILE, then writes OUT: the next generation of FILE whose body
        is the raw bytes of A as the archive (valid or not: this is how the
        test makes archives that break the rules), per "Encoding rules".

    outside_reader.py open-ticket TICKET --guest UUID --host-key-file H
            --sealed FILE [--now UNIX_SECONDS]
        "Migration tickets": opens TICKET (its raw 154 bytes) as the
        destination whose host key file is H, refusing in the spec's order,
        then opens FILE (the sealed file that came with it) with the data
        key it carries. Prints {"verdict", "step", "why"} and, when "ok",
        "generation", "expires", "nonce", "archive_sha256",
        "swtpm_key_sha256". Ticket verdicts: malformed, unsupported-version,
        other-guest, other-host, expired, does-not-open,
        generation-mismatch; then the file's own.

    outside_reader.py vectors
        Prints the spec's test vectors ("Test vectors") computed from their
        inputs: a `key` slot, a `host` slot and a migration ticket (HPKE
        sealed here with the given ephemeral keys, RFC 9180 base mode), as
        JSON of hex strings.

Verdicts are the spec's outcomes: ok, wrong-passphrase, wrong-key,
no-keyslot, corrupt, unsupported-version, guest-mismatch, weak-kdf, missing,
io, passphrase, key.
"""

import argparse
import hashlib
import json
import os
import re
import stat
import struct
import sys
import time

try:
    from argon2.low_level import Type, hash_secret_raw
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
except ImportError as e:  # the Rust test turns this into a clear failure
    print(
        f"outside_reader.py: {e}; install python3-argon2 and python3-cryptography",
        file=sys.stderr,
    )
    sys.exit(3)

# "Limits" and "File layout".
MAGIC = b"VTPMSEAL"
VERSION = 1
VERSION_KINDS = 2
KIND_PASSPHRASE, KIND_KEY, KIND_HOST = 1, 2, 3
HOST_BOUND_LEN = 26
KEY_LEN = 32
HOST_KEY_MAGIC = b"VTPMHKEY"
HOST_KEY_FILE_LEN = 42
BOUND_LEN = 84
SLOT_LEN = 106
SLOT_BOUND_LEN = 46
MAX_SLOTS = 8
MAX_FILE_LEN = 16_778_197
READ_AT_MOST = 16_778_198
MIN_BODY_LEN = 16
MAX_BODY_LEN = 16_777_232
MAX_ARCHIVE_LEN = 16_777_216
MAX_ENTRIES = 64
MAX_NAME_LEN = 64
MAX_PASSPHRASE_LEN = 4096
MAX_MEMORY_KIB = 4_194_304
MAX_LANES = 64
MAX_ITERATIONS = 64
WEAK_MEMORY_KIB = 19_456
WEAK_ITERATIONS = 2

# "Key derivation", "Keyslot wrapping".
BODY_KEY_INFO = b"vtpmd sealed body key v1"
SWTPM_KEY_INFO = b"vtpmd swtpm state key v1"
SLOT_AAD_LABEL = b"vtpmd keyslot v1"
KEY_SLOT_INFO = b"vtpmd key keyslot v2"
HOST_SLOT_INFO = b"vtpmd host keyslot v2"
# RFC 9180: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.
KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002

# "Conventions": canonical lowercase hyphenated, nothing else.
GUEST_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# "Archive (plaintext) encoding": the name rule of the grammar.
NAME_RE = re.compile(rb"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


class Outcome(Exception):
    def __init__(self, verdict, step, why):
        super().__init__(why)
        self.verdict = verdict
        self.step = step
        self.why = why


def corrupt(step, why):
    return Outcome("corrupt", step, why)


def u16(b, at):
    return struct.unpack_from(">H", b, at)[0]


def u32(b, at):
    return struct.unpack_from(">I", b, at)[0]


def u64(b, at):
    return struct.unpack_from(">Q", b, at)[0]


def guest_bytes(text):
    if not GUEST_RE.match(text):
        raise SystemExit(f"outside_reader.py: {text!r} is not a canonical guest id")
    return bytes.fromhex(text.replace("-", ""))


def hkdf(ikm, salt, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


# --- RFC 9180, base mode, single shot (sections 4, 4.1, 5.1, 5.2) -------


def i2osp(n, w):
    return n.to_bytes(w, "big")


def hkdf_extract(salt, ikm):
    h = hmac.HMAC(salt if salt else b"\x00" * 32, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk, info, length):
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


def labeled_extract(suite_id, salt, label, ikm):
    return hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def labeled_expand(suite_id, prk, label, info, length):
    return hkdf_expand(prk, i2osp(length, 2) + b"HPKE-v1" + suite_id + label + info, length)


KEM_SUITE = b"KEM" + i2osp(KEM_ID, 2)
HPKE_SUITE = b"HPKE" + i2osp(KEM_ID, 2) + i2osp(KDF_ID, 2) + i2osp(AEAD_ID, 2)


def x25519_public(sk):
    return (
        X25519PrivateKey.from_private_bytes(sk)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def dhkem_shared_secret(dh, enc, pk_r):
    eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh)
    return labeled_expand(KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)


def key_schedule_base(shared_secret, info):
    psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = labeled_extract(HPKE_SUITE, shared_secret, b"secret", b"")
    key = labeled_expand(HPKE_SUITE, secret, b"key", context, 32)
    base_nonce = labeled_expand(HPKE_SUITE, secret, b"base_nonce", context, 12)
    return key, base_nonce


def hpke_open(sk_r, enc, info, aad, ct):
    """Decap, then the first message (sequence 0: nonce = base_nonce)."""
    pk_r = x25519_public(sk_r)
    dh = X25519PrivateKey.from_private_bytes(sk_r).exchange(
        X25519PublicKey.from_public_bytes(enc)
    )
    if dh == b"\x00" * 32:
        raise InvalidTag()
    key, nonce = key_schedule_base(dhkem_shared_secret(dh, enc, pk_r), info)
    return AESGCM(key).decrypt(nonce, ct, aad)


def hpke_seal(pk_r, sk_e, info, aad, pt):
    """Encap with the given ephemeral key (for test vectors only)."""
    enc = x25519_public(sk_e)
    dh = X25519PrivateKey.from_private_bytes(sk_e).exchange(
        X25519PublicKey.from_public_bytes(pk_r)
    )
    key, nonce = key_schedule_base(dhkem_shared_secret(dh, enc, pk_r), info)
    return enc, AESGCM(key).encrypt(nonce, pt, aad)


def fingerprint(pk):
    return hashlib.sha256(pk).digest()[:16]


# "Migration tickets".
TICKET_MAGIC = b"VTPMTICK"
TICKET_LEN = 154
TICKET_BOUND_LEN = 74
TICKET_INFO = b"vtpmd migration ticket v1"


def open_ticket(t, g, host_sk, now):
    """The destination's refusals, in the spec's order; the data key and
    what the ticket says."""
    if len(t) != TICKET_LEN or t[0:8] != TICKET_MAGIC:
        raise Outcome("malformed", 1, f"{len(t)} bytes, magic {t[0:8]!r}")
    if u16(t, 8) != 1:
        raise Outcome("unsupported-version", 2, f"version {u16(t, 8)}")
    if t[10:26] != g:
        raise Outcome("other-guest", 3, f"for guest {t[10:26].hex()}")
    if t[58:74] != fingerprint(x25519_public(host_sk)):
        raise Outcome("other-host", 4, f"for host {t[58:74].hex()}")
    expires = u64(t, 34)
    if expires <= now:
        raise Outcome("expired", 5, f"expired at {expires}")
    try:
        data_key = hpke_open(
            host_sk, t[TICKET_BOUND_LEN : TICKET_BOUND_LEN + 32], TICKET_INFO + g,
            t[0:TICKET_BOUND_LEN], t[TICKET_BOUND_LEN + 32 :]
        )
    except (InvalidTag, ValueError):
        raise Outcome("does-not-open", 6, "HPKE open failed")
    return data_key, {"generation": u64(t, 26), "expires": expires, "nonce": t[42:58].hex()}


def seal_ticket(data_key, g, generation, expires, nonce, pk, sk_e):
    bound = (
        TICKET_MAGIC + struct.pack(">H", 1) + g + struct.pack(">QQ", generation, expires)
        + nonce + fingerprint(pk)
    )
    assert len(bound) == TICKET_BOUND_LEN
    enc, ct = hpke_seal(pk, sk_e, TICKET_INFO + g, bound, data_key)
    return bound + enc + ct


def read_file(path):
    """Step 0's open and read: no symlink followed, no blocking, regular
    files only, at most READ_AT_MOST bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Outcome("missing", 0, f"{path} does not exist")
    except OSError as e:
        raise Outcome("io", 0, f"{path}: {e}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Outcome("io", 0, f"{path} is not a regular file")
        chunks = []
        left = READ_AT_MOST
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_header(f):
    """Steps 1 to 9. Returns the parsed header."""
    # 1. Magic.
    if len(f) < 8 or f[0:8] != MAGIC:
        raise corrupt(1, "bad magic")
    # 2. Version, before everything else.
    if len(f) < 10:
        raise corrupt(2, "no version")
    version = u16(f, 8)
    if version not in (VERSION, VERSION_KINDS):
        raise Outcome("unsupported-version", 2, f"version {version}")
    # 3. Size.
    if len(f) > MAX_FILE_LEN:
        raise corrupt(3, f"{len(f)} bytes is too large")
    # 4. Keyslot count.
    if len(f) < 85:
        raise corrupt(4, "no keyslot count")
    n = f[84]
    if n == 0 or n > MAX_SLOTS:
        raise corrupt(4, f"keyslot count {n}")
    # 5. Header length.
    h = 117 + SLOT_LEN * n
    if len(f) < h:
        raise corrupt(5, "truncated header")
    # 6. Checksum.
    if hashlib.sha256(f[0 : h - 32]).digest() != f[h - 32 : h]:
        raise corrupt(6, "checksum")
    # 7. Bound fields.
    tpm_version, tpm_model = f[34], f[35]
    body_len = u32(f, 80)
    if tpm_version not in (1, 2) or tpm_model not in (1, 2) or (tpm_version, tpm_model) == (1, 2):
        raise corrupt(7, f"TPM version/model {tpm_version}/{tpm_model}")
    if body_len < MIN_BODY_LEN or body_len > MAX_BODY_LEN:
        raise corrupt(7, f"body_len {body_len}")
    generation = u64(f, 26)
    if generation == 0:
        raise corrupt(7, "generation 0")
    # 8. Keyslots.
    slots = []
    for i in range(n):
        r = f[85 + SLOT_LEN * i : 85 + SLOT_LEN * (i + 1)]
        kind = r[0]
        if kind == KIND_PASSPHRASE:
            argon2_version = r[1]
            m, t, p = u32(r, 2), u32(r, 6), u32(r, 10)
            if argon2_version != 0x13:
                raise corrupt(8, f"keyslot {i}: Argon2 version {argon2_version:#x}")
            if not 1 <= p <= MAX_LANES:
                raise corrupt(8, f"keyslot {i}: lanes {p}")
            if not 8 * p <= m <= MAX_MEMORY_KIB:
                raise corrupt(8, f"keyslot {i}: memory {m}")
            if not 1 <= t <= MAX_ITERATIONS:
                raise corrupt(8, f"keyslot {i}: iterations {t}")
            slots.append(
                {
                    "kind": kind,
                    "bound": r[0:SLOT_BOUND_LEN],
                    "m": m,
                    "t": t,
                    "p": p,
                    "salt": r[14:46],
                    "nonce": r[46:58],
                    "wrapped": r[58:106],
                }
            )
        elif kind in (KIND_KEY, KIND_HOST) and version == VERSION:
            raise corrupt(8, f"keyslot {i}: kind {kind} in a version 1 file")
        elif kind == KIND_KEY:
            if any(r[1:14]):
                raise corrupt(8, f"keyslot {i}: reserved bytes of a key slot")
            slots.append(
                {
                    "kind": kind,
                    "bound": r[0:SLOT_BOUND_LEN],
                    "salt": r[14:46],
                    "nonce": r[46:58],
                    "wrapped": r[58:106],
                }
            )
        elif kind == KIND_HOST:
            if any(r[1:10]):
                raise corrupt(8, f"keyslot {i}: reserved bytes of a host slot")
            slots.append(
                {
                    "kind": kind,
                    "bound": r[0:HOST_BOUND_LEN],
                    "fingerprint": r[10:26],
                    "enc": r[26:58],
                    "wrapped": r[58:106],
                }
            )
        else:
            raise corrupt(8, f"keyslot {i}: kind {kind}")
    if version == VERSION_KINDS and all(s["kind"] == KIND_PASSPHRASE for s in slots):
        raise corrupt(8, "version 2 with passphrase slots only")
    # 9. File length.
    if len(f) != h + body_len:
        raise corrupt(9, f"file is {len(f)} bytes, header says {h + body_len}")
    return {
        "version": version,
        "n": n,
        "h": h,
        "guest": f[10:26],
        "generation": generation,
        "body_salt": f[36:68],
        "body_nonce": f[68:80],
        "body_len": body_len,
        "slots": slots,
    }


def unlock(hdr, g, credential, allow_weak):
    """Step 11, for the credential's kind only. Returns (data key, index)."""
    kind, secret = credential
    tried = False
    refused = False
    for i, s in enumerate(hdr["slots"]):
        aad = SLOT_AAD_LABEL + g + s["bound"]
        if kind == "passphrase" and s["kind"] == KIND_PASSPHRASE:
            if (s["m"] < WEAK_MEMORY_KIB or s["t"] < WEAK_ITERATIONS) and not allow_weak:
                refused = True
                continue
            tried = True
            kek = hash_secret_raw(
                secret=secret,
                salt=s["salt"],
                time_cost=s["t"],
                memory_cost=s["m"],
                parallelism=s["p"],
                hash_len=32,
                type=Type.ID,
                version=0x13,
            )
            opened = lambda: AESGCM(kek).decrypt(s["nonce"], s["wrapped"], aad)
        elif kind == "key" and s["kind"] == KIND_KEY:
            tried = True
            kek = hkdf(secret, s["salt"], KEY_SLOT_INFO + g)
            opened = lambda: AESGCM(kek).decrypt(s["nonce"], s["wrapped"], aad)
        elif (
            kind == "host"
            and s["kind"] == KIND_HOST
            and s["fingerprint"] == fingerprint(x25519_public(secret))
        ):
            tried = True
            opened = lambda: hpke_open(secret, s["enc"], HOST_SLOT_INFO + g, aad, s["wrapped"])
        else:
            continue
        try:
            return opened(), i
        except InvalidTag:
            continue
    if not tried and refused:
        raise Outcome("weak-kdf", 11, "every passphrase slot is below the floor")
    if not tried:
        raise Outcome("no-keyslot", 11, f"no {kind} slot (for this host)")
    if kind == "passphrase":
        raise Outcome("wrong-passphrase", 11, "no keyslot opens")
    raise Outcome("wrong-key", 11, f"no {kind} slot opens")


def decode_archive(a):
    """Step 13: the archive grammar and rules."""
    if len(a) > MAX_ARCHIVE_LEN:
        raise corrupt(13, "archive too large")
    if len(a) < 2:
        raise corrupt(13, "no entry count")
    count = u16(a, 0)
    if count > MAX_ENTRIES:
        raise corrupt(13, f"{count} entries")
    at = 2
    entries = []
    for _ in range(count):
        if at + 1 > len(a):
            raise corrupt(13, "truncated entry")
        name_len = a[at]
        at += 1
        if not 1 <= name_len <= MAX_NAME_LEN or at + name_len > len(a):
            raise corrupt(13, f"name length {name_len}")
        name = a[at : at + name_len]
        at += name_len
        if not NAME_RE.match(name):
            raise corrupt(13, f"name {name!r}")
        if at + 4 > len(a):
            raise corrupt(13, "truncated data length")
        data_len = u32(a, at)
        at += 4
        if at + data_len > len(a):
            raise corrupt(13, "truncated data")
        entries.append((name, a[at : at + data_len]))
        at += data_len
    if at != len(a):
        raise corrupt(13, "trailing bytes")
    for (x, _), (y, _) in zip(entries, entries[1:]):
        if not x < y:
            raise corrupt(13, "names not strictly ascending")
    return entries


def body_aad(f, g):
    """"Body encryption": the bound header with the version field read as
    1, then the guest."""
    return f[0:8] + struct.pack(">H", VERSION) + f[10:BOUND_LEN] + g


def open_file(path, g, credential, allow_weak):
    """The decoding procedure, steps 0 to 13."""
    # 0. The credential, then the file.
    kind, secret = credential
    if kind == "passphrase" and not 1 <= len(secret) <= MAX_PASSPHRASE_LEN:
        raise Outcome("passphrase", 0, f"passphrase of {len(secret)} bytes")
    if kind == "key" and len(secret) != KEY_LEN:
        raise Outcome("key", 0, f"key of {len(secret)} bytes")
    f = read_file(path)
    hdr = decode_header(f)
    # 10. Guest, before any KDF.
    if hdr["guest"] != g:
        raise Outcome("guest-mismatch", 10, f"file of guest {hdr['guest'].hex()}")
    data_key, index = unlock(hdr, g, credential, allow_weak)
    archive, entries = open_body(f, hdr, g, data_key)
    return f, hdr, data_key, index, archive, entries


def open_body(f, hdr, g, data_key):
    """Steps 12 and 13, with the data key in hand."""
    # 12. Body.
    body_key = hkdf(data_key, hdr["body_salt"], BODY_KEY_INFO)
    try:
        archive = AESGCM(body_key).decrypt(hdr["body_nonce"], f[hdr["h"] :], body_aad(f, g))
    except InvalidTag:
        raise corrupt(12, "body tag")
    # 13. Archive.
    return archive, decode_archive(archive)


def cmd_open_ticket(args):
    g = guest_bytes(args.guest)
    host_sk = read_host_key(args.host_key_file)
    with open(args.ticket, "rb") as t:
        ticket = t.read(TICKET_LEN + 1)
    now = args.now if args.now is not None else int(time.time())
    try:
        data_key, said = open_ticket(ticket, g, host_sk, now)
        # The sealed file that came with it: steps 1 to 10, the ticket's
        # generation, then the body with the ticket's key.
        f = read_file(args.sealed)
        hdr = decode_header(f)
        if hdr["guest"] != g:
            raise Outcome("guest-mismatch", 10, f"file of guest {hdr['guest'].hex()}")
        if hdr["generation"] != said["generation"]:
            raise Outcome(
                "generation-mismatch", 10,
                f"file generation {hdr['generation']}, ticket {said['generation']}",
            )
        archive, _ = open_body(f, hdr, g, data_key)
    except Outcome as o:
        return {"verdict": o.verdict, "step": o.step, "why": o.why}
    swtpm_key = hkdf(data_key, None, SWTPM_KEY_INFO + g)
    return {
        "verdict": "ok",
        "step": 13,
        "why": "",
        **said,
        "archive_sha256": hashlib.sha256(archive).hexdigest(),
        "swtpm_key_sha256": hashlib.sha256(swtpm_key).hexdigest(),
    }


def read_host_key(path):
    """"Host key file": magic, version 1, the 32-byte X25519 private key."""
    with open(path, "rb") as h:
        b = h.read(HOST_KEY_FILE_LEN + 1)
    if len(b) != HOST_KEY_FILE_LEN or b[0:8] != HOST_KEY_MAGIC or u16(b, 8) != 1:
        raise SystemExit(f"outside_reader.py: {path} is not a host key file")
    return b[10:42]


def credential_of(args):
    if args.key_file:
        with open(args.key_file, "rb") as k:
            return ("key", k.read())
    if args.host_key_file:
        return ("host", read_host_key(args.host_key_file))
    with open(args.passphrase_file, "rb") as p:
        return ("passphrase", p.read())


def cmd_open(args):
    g = guest_bytes(args.guest)
    credential = credential_of(args)
    try:
        _, hdr, data_key, index, archive, entries = open_file(
            args.file, g, credential, args.allow_weak
        )
    except Outcome as o:
        return {"verdict": o.verdict, "step": o.step, "why": o.why}
    swtpm_key = hkdf(data_key, None, SWTPM_KEY_INFO + g)
    return {
        "verdict": "ok",
        "step": 13,
        "why": "",
        "generation": hdr["generation"],
        "keyslot": index,
        "archive_sha256": hashlib.sha256(archive).hexdigest(),
        "swtpm_key_sha256": hashlib.sha256(swtpm_key).hexdigest(),
        "entries": [
            {
                "name": name.decode("ascii"),
                "len": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            for name, data in entries
        ],
    }


def cmd_seal_archive(args):
    """"Encoding rules": a new generation with fresh body salt and nonce,
    the keyslots copied unchanged. The archive bytes are taken as given."""
    g = guest_bytes(args.guest)
    credential = credential_of(args)
    with open(args.archive, "rb") as a:
        archive = a.read()
    f, hdr, data_key, _, _, _ = open_file(args.file, g, credential, args.allow_weak)
    body_salt, body_nonce = os.urandom(32), os.urandom(12)
    bound = (
        f[0:26]
        + struct.pack(">Q", hdr["generation"] + 1)
        + f[34:36]
        + body_salt
        + body_nonce
        + struct.pack(">I", len(archive) + 16)
    )
    assert len(bound) == BOUND_LEN
    covered = bound + f[BOUND_LEN : hdr["h"] - 32]
    header = covered + hashlib.sha256(covered).digest()
    body_key = hkdf(data_key, body_salt, BODY_KEY_INFO)
    body = AESGCM(body_key).encrypt(body_nonce, archive, body_aad(bound, g))
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(header + body)
    return {"written": args.out, "generation": hdr["generation"] + 1}


def seq(start, n):
    return bytes(range(start, start + n))


# "Test vectors": the inputs, each a run of consecutive byte values.
VECTOR_GUEST = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40"
VECTOR_DATA_KEY = seq(0x00, 32)
VECTOR_KEY = seq(0x40, 32)
VECTOR_KEY_SALT = seq(0x60, 32)
VECTOR_KEY_NONCE = seq(0x80, 12)
VECTOR_HOST_SK = seq(0xA0, 32)
VECTOR_EPHEMERAL_SK = seq(0xC0, 32)
VECTOR_TICKET_EPHEMERAL_SK = seq(0x20, 32)
VECTOR_TICKET_NONCE = seq(0xE0, 16)
VECTOR_TICKET_GENERATION = 7
VECTOR_TICKET_EXPIRES = 4102444800  # 2100-01-01T00:00:00Z


def cmd_vectors(_args):
    """Each slot record built from the spec's layout, and checked by
    opening it again the way step 11 does."""
    g = guest_bytes(VECTOR_GUEST)
    key_bound = bytes([KIND_KEY]) + bytes(13) + VECTOR_KEY_SALT
    kek = hkdf(VECTOR_KEY, VECTOR_KEY_SALT, KEY_SLOT_INFO + g)
    wrapped = AESGCM(kek).encrypt(VECTOR_KEY_NONCE, VECTOR_DATA_KEY, SLOT_AAD_LABEL + g + key_bound)
    key_record = key_bound + VECTOR_KEY_NONCE + wrapped
    pk = x25519_public(VECTOR_HOST_SK)
    host_bound = bytes([KIND_HOST]) + bytes(9) + fingerprint(pk)
    enc, ct = hpke_seal(
        pk, VECTOR_EPHEMERAL_SK, HOST_SLOT_INFO + g, SLOT_AAD_LABEL + g + host_bound, VECTOR_DATA_KEY
    )
    host_record = host_bound + enc + ct
    assert len(key_record) == SLOT_LEN and len(host_record) == SLOT_LEN
    assert hpke_open(VECTOR_HOST_SK, enc, HOST_SLOT_INFO + g, SLOT_AAD_LABEL + g + host_bound, ct) == VECTOR_DATA_KEY
    ticket = seal_ticket(
        VECTOR_DATA_KEY, g, VECTOR_TICKET_GENERATION, VECTOR_TICKET_EXPIRES,
        VECTOR_TICKET_NONCE, pk, VECTOR_TICKET_EPHEMERAL_SK,
    )
    assert len(ticket) == TICKET_LEN
    assert open_ticket(ticket, g, VECTOR_HOST_SK, 0)[0] == VECTOR_DATA_KEY
    return {
        "guest": VECTOR_GUEST,
        "data_key": VECTOR_DATA_KEY.hex(),
        "key": VECTOR_KEY.hex(),
        "key_kek": kek.hex(),
        "key_record": key_record.hex(),
        "host_private_key": VECTOR_HOST_SK.hex(),
        "host_public_key": pk.hex(),
        "host_fingerprint": fingerprint(pk).hex(),
        "ephemeral_private_key": VECTOR_EPHEMERAL_SK.hex(),
        "host_record": host_record.hex(),
        "ticket_ephemeral_private_key": VECTOR_TICKET_EPHEMERAL_SK.hex(),
        "ticket": ticket.hex(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("open", "seal-archive"):
        p = sub.add_parser(name)
        p.add_argument("file")
        p.add_argument("--guest", required=True)
        secret = p.add_mutually_exclusive_group(required=True)
        secret.add_argument("--passphrase-file")
        secret.add_argument("--key-file")
        secret.add_argument("--host-key-file")
        p.add_argument("--allow-weak", action="store_true")
        if name == "seal-archive":
            p.add_argument("--archive", required=True)
            p.add_argument("--out", required=True)
    t = sub.add_parser("open-ticket")
    t.add_argument("ticket")
    t.add_argument("--guest", required=True)
    t.add_argument("--host-key-file", required=True)
    t.add_argument("--sealed", required=True)
    t.add_argument("--now", type=int)
    sub.add_parser("vectors")
    args = parser.parse_args()
    commands = {
        "open": cmd_open,
        "seal-archive": cmd_seal_archive,
        "open-ticket": cmd_open_ticket,
        "vectors": cmd_vectors,
    }
    print(json.dumps(commands[args.command](args)))


if __name__ == "__main__":
    main()
