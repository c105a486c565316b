"""Cross-tenant probes: tenant A's credentials aimed at tenant B's resources.

Run by tests/e2e/tests/python_clients.rs with GRANARY_S3, GRANARY_KV, GRANARY_ADMIN,
GRANARY_ADMIN_TOKEN and tenant B's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Creates
tenant A through the admin API. Every probe sends the same request twice with A's key:
once at B's resource, once at a resource that does not exist. The two answers must be
identical (status, error code, body and headers, apart from request ids, dates and
lengths) and refuse or show nothing of B; B checks afterwards that nothing of it
changed. Raw SigV4-signed HTTP (botocore's signer) so the whole answer is compared;
boto3 and the AWS CLI for the client-level cases.
"""
import base64
import hashlib
import http.client
import json
import os
import subprocess
import urllib.parse
import uuid

import boto3
import urllib3
from botocore.auth import SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

S3 = os.environ["GRANARY_S3"]
KV = os.environ["GRANARY_KV"]
ADMIN = os.environ["GRANARY_ADMIN"]
TOKEN = os.environ["GRANARY_ADMIN_TOKEN"]
B_KEY = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])


def admin(method, path, body=None):
    u = urllib.parse.urlparse(ADMIN)
    conn = http.client.HTTPConnection(u.netloc, timeout=30)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    assert r.status < 300, (method, path, r.status, data)
    return json.loads(data) if data else None


admin("POST", "/admin/v1/tenants", {"name": "tenant-a"})
k = admin("POST", "/admin/v1/tenants/tenant-a/keys", {"description": "probe"})
A_KEY = Credentials(k["accessKeyId"], k["secretAccessKey"])


def client(creds):
    return boto3.client("s3", endpoint_url=S3, region_name="us-east-1",
                        aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
                        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                      retries={"max_attempts": 1}))


a, b = client(A_KEY), client(B_KEY)


def send(base, creds, method, path, query="", headers=None, body=b"", service="s3", sign=True):
    headers = dict(headers or {})
    url = f"{base}{path}" + (f"?{query}" if query else "")
    if sign:
        if service == "s3":
            headers.setdefault("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
        req = AWSRequest(method=method, url=url, headers=headers, data=body)
        SigV4Auth(creds, service, "us-east-1").add_auth(req)
        headers = dict(req.headers.items())
    conn = http.client.HTTPConnection(urllib.parse.urlparse(base).netloc, timeout=30)
    conn.request(method, path + (f"?{query}" if query else ""), body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


VOLATILE = {"x-amz-request-id", "x-amz-id-2", "date", "content-length", "x-granary-trace-id",
            "traceparent"}


def normal(answer):
    status, headers, body = answer
    body = body.decode(errors="replace")
    for tag in ("RequestId", "HostId"):
        start, end = body.find(f"<{tag}>"), body.find(f"</{tag}>")
        if start >= 0 and end > start:
            body = body[:start] + body[end + len(tag) + 3:]
    try:
        j = json.loads(body)
        if isinstance(j, dict):
            j.pop("requestId", None)
            body = json.dumps(j, sort_keys=True)
    except ValueError:
        pass
    return status, {k: v for k, v in headers.items() if k not in VOLATILE}, body


probes = 0


def code_of(answer):
    """The error code of a normalised answer (S3 XML or KV JSON), if any."""
    status, _, body = answer
    if "<Code>" in body:
        return body.split("<Code>", 1)[1].split("</Code>", 1)[0]
    try:
        return json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None


def probe(name, method, path_b, path_none, query="", headers=None, body=b"", base=S3,
          service="s3", expect=(404, "NoSuchBucket")):
    """A's request at B's resource answers exactly like the same request at a missing
    one, and that answer is the expected refusal (not some unrelated error)."""
    global probes
    ab = normal(send(base, A_KEY, method, path_b, query, headers, body, service))
    an = normal(send(base, A_KEY, method, path_none, query, headers, body, service))
    assert ab == an, f"{name}: B's resource and a missing one answer differently:\n{ab}\n{an}"
    status, code = expect
    assert ab[0] == status, f"{name}: expected {status}, got {ab}"
    if code is not None and method != "HEAD":
        assert code_of(ab) == code, f"{name}: expected {code}, got {ab}"
    probes += 1
    print(f"probe {probes}: {name}: {ab[0]} {code_of(ab)}", flush=True)


# --- Tenant B's resources -------------------------------------------------------
BB = "b-private"
b.create_bucket(Bucket=BB)
secret = os.urandom(50_000)
b.put_object(Bucket=BB, Key="secret.txt", Body=secret, Metadata={"owner": "b"})
b.put_object_tagging(Bucket=BB, Key="secret.txt", Tagging={"TagSet": [{"Key": "t", "Value": "b"}]})
b.put_bucket_tagging(Bucket=BB, Tagging={"TagSet": [{"Key": "t", "Value": "b"}]})
b_upload = b.create_multipart_upload(Bucket=BB, Key="big")["UploadId"]
b.upload_part(Bucket=BB, Key="big", UploadId=b_upload, PartNumber=1, Body=b"part-of-b")
# B's bucket whose name A also uses for a bucket of its own.
SHARED = "shared-name"
b.create_bucket(Bucket=SHARED)
b.put_object(Bucket=SHARED, Key="doc", Body=b"b's doc")
b_shared_upload = b.create_multipart_upload(Bucket=SHARED, Key="doc")["UploadId"]
b.upload_part(Bucket=SHARED, Key="doc", UploadId=b_shared_upload, PartNumber=1, Body=b"b part")
st, _, _ = send(KV, B_KEY, "PUT", "/kv/v1/app/config", body=b"b-value", service="kv",
                headers={"content-type": "application/octet-stream"})
assert st in (200, 201, 204), st

# --- Tenant A ---------------------------------------------------------------------
a.create_bucket(Bucket="a-own")
a.create_bucket(Bucket=SHARED)  # its own bucket of the same name: names are per tenant
a.put_object(Bucket="a-own", Key="mine", Body=b"a's")
NONE = "no-such-bucket-" + uuid.uuid4().hex[:8]
FAKE_UPLOAD = str(uuid.uuid4())

# Bucket-level S3 operations on B's bucket.
for method, query in [("HEAD", ""), ("GET", ""), ("GET", "list-type=2"), ("GET", "uploads"),
                      ("GET", "location"), ("GET", "tagging"), ("GET", "publicAccessBlock"),
                      ("PUT", "tagging"), ("DELETE", "tagging"), ("DELETE", "")]:
    body = b""
    if method == "PUT":
        body = b'<Tagging><TagSet><Tag><Key>x</Key><Value>a</Value></Tag></TagSet></Tagging>'
    probe(f"{method} bucket ?{query}", method, f"/{BB}", f"/{NONE}", query, body=body)
# Object-level.
for method, query, body in [("GET", "", b""), ("HEAD", "", b""), ("PUT", "", b"overwrite"),
                            ("DELETE", "", b""), ("GET", "tagging", b""),
                            ("PUT", "tagging", b'<Tagging><TagSet></TagSet></Tagging>'),
                            ("DELETE", "tagging", b""), ("GET", "attributes", b""),
                            ("POST", "uploads", b""), ("GET", "partNumber=1", b"")]:
    hdrs = {"x-amz-object-attributes": "ETag"} if query == "attributes" else None
    probe(f"{method} object ?{query}", method, f"/{BB}/secret.txt", f"/{NONE}/secret.txt", query,
          headers=hdrs, body=body)
# B's upload id, in B's bucket and in A's bucket of the same name as B's.
for method, query, body in [("PUT", "partNumber=2&uploadId={u}", b"evil"),
                            ("GET", "uploadId={u}", b""), ("DELETE", "uploadId={u}", b""),
                            ("POST", "uploadId={u}",
                             b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>"
                             b"<ETag>x</ETag></Part></CompleteMultipartUpload>")]:
    probe(f"{method} B's upload in B's bucket", method, f"/{BB}/big", f"/{NONE}/big",
          query.format(u=b_upload), body=body)
    # In A's own "shared-name": B's upload id must be as unknown as a made-up one.
    ab = normal(send(S3, A_KEY, method, f"/{SHARED}/doc", query.format(u=b_shared_upload), body=body))
    an = normal(send(S3, A_KEY, method, f"/{SHARED}/doc", query.format(u=FAKE_UPLOAD), body=body))
    assert ab == an and ab[0] == 404, f"B's upload id in A's same-named bucket: {ab} vs {an}"
    assert code_of(ab) == "NoSuchUpload", ab
    probes += 1
    print(f"probe {probes}: {method} B's upload id in A's same-named bucket: {ab[0]}")
# Copy sources in B's bucket, into A's own bucket.
for name, path, headers, query in [
        ("CopyObject", "/a-own/stolen", {"x-amz-copy-source": "/{src}/secret.txt"}, ""),
        ("UploadPartCopy", "/a-own/stolen", {"x-amz-copy-source": "/{src}/secret.txt"},
         "partNumber=1&uploadId={u}")]:
    up = a.create_multipart_upload(Bucket="a-own", Key="stolen")["UploadId"] if "uploadId" in query else ""
    hb = {k: v.format(src=BB) for k, v in headers.items()}
    hn = {k: v.format(src=NONE) for k, v in headers.items()}
    ab = normal(send(S3, A_KEY, "PUT", path, query.format(u=up), hb))
    an = normal(send(S3, A_KEY, "PUT", path, query.format(u=up), hn))
    assert ab == an and ab[0] == 404 and code_of(ab) == "NoSuchBucket", f"{name} from B's bucket: {ab} vs {an}"
    probes += 1
    print(f"probe {probes}: {name} with B's object as the source: {ab[0]}")
    # From A's own bucket named like B's: A's bucket has no such key.
    hs = {k: v.format(src=SHARED) for k, v in headers.items()}
    ab = normal(send(S3, A_KEY, "PUT", path, query.format(u=up), hs))
    assert ab[0] == 404 and code_of(ab) == "NoSuchKey", f"{name} from A's same-named bucket found B's data: {ab}"
    probes += 1
    print(f"probe {probes}: {name} from A's bucket named like B's: {ab[0]}")
# Presigned URLs minted with A's key for B's object.
for method in ("GET", "PUT", "DELETE", "HEAD"):
    answers = []
    for bucket in (BB, NONE):
        req = AWSRequest(method=method, url=f"{S3}/{bucket}/secret.txt")
        S3SigV4QueryAuth(A_KEY, "s3", "us-east-1", expires=300).add_auth(req)
        u = urllib.parse.urlparse(req.url)
        answers.append(normal(send(S3, A_KEY, method, u.path, u.query,
                                   body=b"x" if method == "PUT" else b"", sign=False)))
    assert answers[0] == answers[1] and answers[0][0] == 404, f"presigned {method}: {answers}"
    if method != "HEAD":
        assert code_of(answers[0]) == "NoSuchBucket", answers[0]
    probes += 1
    print(f"probe {probes}: presigned {method} of B's object with A's key: {answers[0][0]}")
# The positive control: the same presigned GET for A's own object works.
req = AWSRequest(method="GET", url=f"{S3}/a-own/mine")
S3SigV4QueryAuth(A_KEY, "s3", "us-east-1", expires=300).add_auth(req)
u = urllib.parse.urlparse(req.url)
st, _, got = send(S3, A_KEY, "GET", u.path, u.query, sign=False)
assert st == 200 and got == b"a's", (st, got)
# A form upload into B's bucket with A's signed policy.
answers = []
for bucket in (BB, NONE):
    post = a.generate_presigned_post(bucket, "planted", ExpiresIn=300)
    body, ctype = urllib3.encode_multipart_formdata(list(post["fields"].items()) +
                                                    [("file", ("f", b"planted", "text/plain"))])
    answers.append(normal(send(S3, A_KEY, "POST", f"/{bucket}", headers={"Content-Type": ctype},
                               body=body, sign=False)))
assert answers[0] == answers[1] and answers[0][0] == 404, f"POST Object into B's bucket: {answers}"
probes += 1
print(f"probe {probes}: POST Object into B's bucket: {answers[0][0]}")
# DeleteObjects naming B's key.
xml = b"<Delete><Object><Key>secret.txt</Key></Object></Delete>"
md5 = base64.b64encode(hashlib.md5(xml).digest()).decode()
probe("DeleteObjects", "POST", f"/{BB}", f"/{NONE}", "delete", headers={"Content-MD5": md5}, body=xml)

# KV: A's namespace "app" is A's own; B's key in it does not exist for A.
for method, path, query, body, expect in [
        ("GET", "/kv/v1/app/config", "", b"", (404, "NotFound")),
        ("DELETE", "/kv/v1/app/config", "", b"", (404, "NotFound")),
        ("GET", "/kv/v1/app", "prefix=con", b"", (200, None)),
        ("GET", "/kv/v1/app", "", b"", (200, None)),
                                  ("POST", "/kv/v1/app", "batchGet",
        json.dumps({"keys": ["Y29uZmln"]}).encode(), (200, None))]:  # "config"
    none_path = path.replace("/app", "/never-used-ns")
    h = {"content-type": "application/json"} if method == "POST" else None
    probe(f"KV {method} {path}?{query}", method, path, none_path, query, headers=h, body=body,
          base=KV, service="kv", expect=expect)
st, _, body = send(KV, A_KEY, "GET", "/kv/v1/app", service="kv")
assert st == 200 and b"Y29uZmln" not in body and b"config" not in body, (st, body)
st, _, body = send(KV, A_KEY, "POST", "/kv/v1/app", "batchGet", {"content-type": "application/json"},
                   json.dumps({"keys": ["Y29uZmln"]}).encode(), service="kv")
assert st == 200 and b"b-value" not in body and b"Yi12YWx1ZQ" not in body, (st, body)

# Client-level: boto3 and the AWS CLI.
buckets = [x["Name"] for x in a.list_buckets()["Buckets"]]
assert sorted(buckets) == ["a-own", SHARED], buckets
probes += 1
for fn, kw in [(a.get_object, {"Bucket": BB, "Key": "secret.txt"}),
               (a.list_objects_v2, {"Bucket": BB}),
               (a.list_parts, {"Bucket": BB, "Key": "big", "UploadId": b_upload}),
               (a.get_object, {"Bucket": SHARED, "Key": "doc"})]:
    try:
        fn(**kw)
        raise AssertionError(f"{fn.__name__} {kw} succeeded for tenant A")
    except ClientError as e:
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 404, e.response
    probes += 1
env = dict(os.environ, AWS_ACCESS_KEY_ID=A_KEY.access_key, AWS_SECRET_ACCESS_KEY=A_KEY.secret_key,
           AWS_DEFAULT_REGION="us-east-1")
r = subprocess.run(["aws", "--endpoint-url", S3, "s3", "ls", f"s3://{BB}"], env=env,
                   capture_output=True, text=True)
assert r.returncode != 0 and "NoSuchBucket" in r.stderr, (r.returncode, r.stdout, r.stderr)
r = subprocess.run(["aws", "--endpoint-url", S3, "s3", "rm", f"s3://{BB}/secret.txt"], env=env,
                   capture_output=True, text=True)
assert r.returncode != 0 and "NoSuchBucket" in r.stderr, (r.stdout, r.stderr)
probes += 2

# --- B afterwards: nothing changed -----------------------------------------------
o = b.get_object(Bucket=BB, Key="secret.txt")
assert o["Body"].read() == secret and o["Metadata"] == {"owner": "b"}
assert b.get_object_tagging(Bucket=BB, Key="secret.txt")["TagSet"] == [{"Key": "t", "Value": "b"}]
assert b.get_bucket_tagging(Bucket=BB)["TagSet"] == [{"Key": "t", "Value": "b"}]
assert [k["Key"] for k in b.list_objects_v2(Bucket=BB)["Contents"]] == ["secret.txt"]
parts = b.list_parts(Bucket=BB, Key="big", UploadId=b_upload)["Parts"]
assert [p["PartNumber"] for p in parts] == [1], parts
parts = b.list_parts(Bucket=SHARED, Key="doc", UploadId=b_shared_upload)["Parts"]
assert [p["PartNumber"] for p in parts] == [1], parts
assert b.get_object(Bucket=SHARED, Key="doc")["Body"].read() == b"b's doc"
assert sorted(x["Name"] for x in b.list_buckets()["Buckets"]) == [BB, SHARED]
st, _, v = send(KV, B_KEY, "GET", "/kv/v1/app/config", service="kv")
assert st == 200 and v == b"b-value", (st, v)
usage = admin("GET", "/admin/v1/tenants/default/usage")
assert usage["objects"] == 2, usage

assert probes >= 40, probes
print(f"tenant probes: all {probes} probes passed")
