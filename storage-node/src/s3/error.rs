//! The one place model errors become S3 errors.

use s3s::{S3Error, S3ErrorCode, s3_error};

use crate::model::Error;

pub fn to_s3(e: Error) -> S3Error {
    match e {
        Error::NoSuchBucket => s3_error!(NoSuchBucket, "The specified bucket does not exist"),
        Error::BucketAlreadyOwnedByYou => s3_error!(
            BucketAlreadyOwnedByYou,
            "Your previous request to create the named bucket succeeded and you already own it"
        ),
        Error::BucketNotEmpty => s3_error!(
            BucketNotEmpty,
            "The bucket you tried to delete is not empty"
        ),
        Error::NoSuchKey => s3_error!(NoSuchKey, "The specified key does not exist"),
        Error::NoSuchUpload => s3_error!(
            NoSuchUpload,
            "The specified multipart upload does not exist"
        ),
        Error::PreconditionFailed => s3_error!(
            PreconditionFailed,
            "At least one of the preconditions you specified did not hold"
        ),
        Error::ConditionalRequestConflict => s3_error!(
            ConditionalRequestConflict,
            "A conflicting operation occurred during the conditional write; retry the request"
        ),
        Error::NotModified {
            etag,
            last_modified,
        } => super::object::not_modified(&etag, last_modified),
        Error::InvalidRange { size } => s3_error!(
            InvalidRange,
            "The requested range is not satisfiable (object size {size})"
        ),
        Error::InvalidPart(n) => s3_error!(
            InvalidPart,
            "Part {n} could not be found or its ETag does not match"
        ),
        Error::InvalidPartOrder => s3_error!(
            InvalidPartOrder,
            "The list of parts was not in ascending order"
        ),
        Error::EntityTooSmall { part, size } => {
            s3_error!(
                EntityTooSmall,
                "Part {part} is {size} bytes; every part but the last must be at least 5 MiB"
            )
        }
        Error::BadDigest => s3_error!(
            BadDigest,
            "The Content-MD5 you specified did not match what we received"
        ),
        Error::BadChecksum(algorithm) => S3Error::with_message(
            S3ErrorCode::BadDigest,
            format!("The {algorithm} you specified did not match the calculated checksum."),
        ),
        Error::InvalidTag(m) => S3Error::with_message(S3ErrorCode::InvalidTag, m),
        Error::InvalidPartNumber(n) => {
            let mut e = S3Error::with_message(
                S3ErrorCode::Custom("InvalidPartNumber".into()),
                format!("The requested partnumber is not satisfiable (part {n})"),
            );
            e.set_status_code(http::StatusCode::RANGE_NOT_SATISFIABLE);
            e
        }
        Error::VersionMismatch { .. } => s3_error!(
            PreconditionFailed,
            "At least one of the preconditions you specified did not hold"
        ),
        Error::Invalid(m) => S3Error::with_message(S3ErrorCode::InvalidArgument, m),
        Error::IncompleteBody(m) => S3Error::with_message(S3ErrorCode::IncompleteBody, m),
        Error::Corrupt(m) => {
            tracing::error!(error = %m, "corrupt data detected on read");
            S3Error::with_message(
                S3ErrorCode::InternalError,
                "stored data failed its checksum; it will not be served",
            )
        }
        Error::QuotaExceeded(q) => {
            let mut e =
                S3Error::with_message(S3ErrorCode::Custom("QuotaExceeded".into()), q.to_string());
            e.set_status_code(http::StatusCode::FORBIDDEN);
            e
        }
        Error::NotPrimary(m)
        | Error::NotEnoughReplicas(m)
        | Error::QuotaUndecided(m)
        | Error::ColdTierUnavailable(m) => {
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, m)
        }
        e @ Error::CopySourceElsewhere => {
            S3Error::with_message(S3ErrorCode::NotImplemented, e.to_string())
        }
        e @ (Error::Engine(_) | Error::Catalog(_)) => {
            tracing::error!(error = %e, "internal error");
            S3Error::with_message(S3ErrorCode::InternalError, "internal error")
        }
    }
}
