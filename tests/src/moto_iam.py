"""Sets up IAM users on a moto_server started with INITIAL_NO_AUTH_ACTION_COUNT=3.

Reads JSON from stdin: {"endpoint": URL, "buckets": [NAME, ...],
"users": {NAME: [policy statement, ...], ...}}. Prints JSON {NAME: [key id, secret], ...},
with "admin" (allowed everything) among them.
"""
import json
import sys

import boto3

spec = json.load(sys.stdin)


def client(service, key=("unsigned", "unsigned")):
    return boto3.client(
        service,
        endpoint_url=spec["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=key[0],
        aws_secret_access_key=key[1],
    )


def policy(statements):
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


# These three are the requests moto serves before it enforces authentication.
iam = client("iam")
iam.create_user(UserName="admin")
iam.put_user_policy(
    UserName="admin",
    PolicyName="all",
    PolicyDocument=policy([{"Effect": "Allow", "Action": "*", "Resource": "*"}]),
)
k = iam.create_access_key(UserName="admin")["AccessKey"]
admin = (k["AccessKeyId"], k["SecretAccessKey"])
keys = {"admin": admin}

iam = client("iam", admin)
s3 = client("s3", admin)
for bucket in spec["buckets"]:
    s3.create_bucket(Bucket=bucket)
for name, statements in spec["users"].items():
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="scope", PolicyDocument=policy(statements))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    keys[name] = (k["AccessKeyId"], k["SecretAccessKey"])
print(json.dumps(keys))
