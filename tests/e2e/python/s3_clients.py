"""boto3, the AWS CLI and curl --aws-sigv4 against a running Granary node.

Run by tests/e2e/tests/python_clients.rs with GRANARY_S3, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY set. Exits non-zero on the first failed check.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import urllib.error

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

EP = os.environ["GRANARY_S3"]
AK = os.environ["AWS_ACCESS_KEY_ID"]
SK = os.environ["AWS_SECRET_ACCESS_KEY"]

s3 = boto3.client("s3", endpoint_url=EP, region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}, signature_version="s3v4", retries={"max_attempts": 1}))


def expect_error(code, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}"
        return
    raise AssertionError(f"expected {code}, call succeeded")


s3.create_bucket(Bucket="pyb")
expect_error("BucketAlreadyOwnedByYou", s3.create_bucket, Bucket="pyb")
body = os.urandom(200_000)
s3.put_object(Bucket="pyb", Key="dir/one", Body=body, ContentType="text/plain", Metadata={"a": "1"})
o = s3.get_object(Bucket="pyb", Key="dir/one")
assert o["Body"].read() == body
assert o["ContentType"] == "text/plain" and o["Metadata"] == {"a": "1"}
assert o["ETag"].strip('"') == hashlib.md5(body).hexdigest()
assert s3.get_object(Bucket="pyb", Key="dir/one", Range="bytes=5-9")["Body"].read() == body[5:10]
expect_error("NoSuchKey", s3.get_object, Bucket="pyb", Key="missing")

# Keys that need URL encoding survive the encoding-type=url round trip of ListObjects.
odd = "odd key+plus%percent/ü"
s3.put_object(Bucket="pyb", Key=odd, Body=b"odd")
keys = [c["Key"] for c in s3.list_objects(Bucket="pyb")["Contents"]]
assert odd in keys, keys
lst = s3.list_objects_v2(Bucket="pyb", Delimiter="/")
assert [p["Prefix"] for p in lst["CommonPrefixes"]] == ["dir/", "odd key+plus%percent/"], lst

# Multipart through the transfer manager: 16 MiB in 5 MiB parts (4 parts).
big = os.urandom(16 * 1024 * 1024)
cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
s3.upload_fileobj(io.BytesIO(big), "pyb", "big", Config=cfg)
h = s3.head_object(Bucket="pyb", Key="big")
assert h["ContentLength"] == len(big) and h["ETag"].endswith('-4"'), h
out = io.BytesIO()
s3.download_fileobj("pyb", "big", out, Config=cfg)
assert out.getvalue() == big

s3.copy_object(Bucket="pyb", Key="copy", CopySource={"Bucket": "pyb", "Key": "dir/one"})
assert s3.get_object(Bucket="pyb", Key="copy")["Body"].read() == body
r = s3.delete_objects(Bucket="pyb", Delete={"Objects": [{"Key": "copy"}, {"Key": odd}]})
assert len(r["Deleted"]) == 2

# Presigned GET and PUT with plain HTTP.
url = s3.generate_presigned_url("put_object", Params={"Bucket": "pyb", "Key": "pre"}, ExpiresIn=300)
req = urllib.request.Request(url, data=b"presigned body", method="PUT")
try:
    assert urllib.request.urlopen(req).status == 200
except urllib.error.HTTPError as e:
    raise AssertionError(f"presigned PUT failed: {url}\n{e.read().decode()}")
url = s3.generate_presigned_url("get_object", Params={"Bucket": "pyb", "Key": "pre"}, ExpiresIn=300)
assert urllib.request.urlopen(url).read() == b"presigned body"

# The AWS CLI.
env = dict(os.environ, AWS_DEFAULT_REGION="us-east-1")
with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "f.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(7 * 1024 * 1024))
    subprocess.run(["aws", "--endpoint-url", EP, "s3", "cp", src, "s3://pyb/cli/f.bin", "--only-show-errors"], check=True, env=env)
    subprocess.run(["aws", "--endpoint-url", EP, "s3", "cp", "s3://pyb/cli/f.bin", src + ".back", "--only-show-errors"], check=True, env=env)
    assert open(src, "rb").read() == open(src + ".back", "rb").read()
    out = subprocess.run(["aws", "--endpoint-url", EP, "s3api", "list-objects-v2", "--bucket", "pyb", "--prefix", "cli/"],
                         check=True, env=env, capture_output=True, text=True).stdout
    assert [c["Key"] for c in json.loads(out)["Contents"]] == ["cli/f.bin"]

# Virtual-host style: bucket in the Host header (curl signs with SigV4 itself).
port = EP.rsplit(":", 1)[1]
vh = subprocess.run(["curl", "-sS", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{AK}:{SK}",
                     "--connect-to", f"pyb.localhost:{port}:127.0.0.1:{port}",
                     "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                     f"http://pyb.localhost:{port}/dir/one"], capture_output=True)
assert vh.returncode == 0, vh.stderr
assert vh.stdout == body, "virtual-host GET returned other bytes"

print("python clients: all checks passed")
