"""An S3 client for the interop suite, driven by the Rust tests: boto3, a client nobody in
this project wrote, acting for the bucket owner (or for the peer, in control uploads).

One process serves many calls, so that each call costs milliseconds rather than a Python
start-up. Protocol: one JSON request per line on stdin, one JSON answer per line on stdout.

  request   {"op": "<boto3 S3 method>", "args": {...},
             "body_file": "<path>"   (optional: sent as Body),
             "save_body": "<path>"}  (optional: the response's Body is written there)
  answer    {"ok": {...the response, minus ResponseMetadata, plus "HTTPStatusCode"}}
            {"error": {"code": "AccessDenied", "status": 403, "message": "..."}}

usage: s3_client.py ENDPOINT ACCESS_KEY SECRET_KEY
"""
import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def make_client(endpoint, key, secret):
    config = Config(
        s3={"addressing_style": "path"},
        # One attempt: a refusal is the answer under test, not something to retry. Bounded
        # waits: a server that never answers fails the call instead of hanging the test.
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # Plain bodies with Content-MD5, which every server here accepts (RGW 16 rejects
        # the aws-chunked uploads that newer botocore sends by default).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=config,
    )


def call(client, request):
    args = dict(request.get("args", {}))
    body = None
    if "body_file" in request:
        body = open(request["body_file"], "rb")
        args["Body"] = body
    try:
        response = getattr(client, request["op"])(**args)
    except ClientError as e:
        error = e.response.get("Error", {})
        return {
            "error": {
                "code": error.get("Code"),
                "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                "message": error.get("Message") or "",
            }
        }
    finally:
        if body is not None:
            body.close()
    status = response.pop("ResponseMetadata", {}).get("HTTPStatusCode")
    if "Body" in response:
        stream = response.pop("Body")
        if "save_body" in request:
            with open(request["save_body"], "wb") as out:
                for chunk in stream.iter_chunks(1 << 20):
                    out.write(chunk)
        else:
            stream.read()
    response["HTTPStatusCode"] = status
    return {"ok": response}


def main():
    endpoint, key, secret = sys.argv[1:4]
    client = make_client(endpoint, key, secret)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = call(client, request)
        except Exception as e:  # a bug here must reach the test, not kill the process
            answer = {"error": {"code": "ClientFailure", "status": None, "message": repr(e)}}
        # default=str: datetimes (LastModified) become text.
        sys.stdout.write(json.dumps(answer, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
