use super::*;

#[test]
fn http_error_survives_a_trip_through_io_error() {
    let io = HttpError::PayloadTooLarge { limit_bytes: 7 }.into_io();
    let back = HttpError::from(io);
    assert!(matches!(
        back,
        HttpError::PayloadTooLarge { limit_bytes: 7 }
    ));
    assert_eq!(back.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[test]
fn plain_io_errors_stay_io_and_timeouts_map_to_408() {
    let e = HttpError::from(io::Error::from(io::ErrorKind::WouldBlock));
    assert!(matches!(e, HttpError::Io(_)));
    assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
    let e = HttpError::from(io::Error::from(io::ErrorKind::ConnectionReset));
    assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn every_variant_has_a_status_and_a_message() {
    let all = [
        (HttpError::HeadTimeout, 408),
        (HttpError::RequestLineTooLong { limit_bytes: 1 }, 414),
        (HttpError::HeadTooLarge { limit_bytes: 1 }, 431),
        (HttpError::TooManyHeaders { limit: 1 }, 431),
        (HttpError::MalformedHead("x".into()), 400),
        (HttpError::UnsupportedVersion("HTTP/2.0".into()), 505),
        (HttpError::Http2Preface, 505),
        (HttpError::ConflictingFraming, 400),
        (HttpError::InvalidContentLength, 400),
        (HttpError::InvalidTransferEncoding, 400),
        (HttpError::UnsupportedTransferEncoding("gzip".into()), 501),
        (HttpError::PayloadTooLarge { limit_bytes: 1 }, 413),
        (HttpError::MalformedChunk("x"), 400),
        (HttpError::BodyIncomplete, 400),
    ];
    for (error, code) in all {
        assert_eq!(error.status().as_u16(), code, "{error:?}");
        assert!(!error.to_string().is_empty());
    }
}
