use super::*;

#[test]
fn saturated_has_retry_after() {
    let r = ApiError::saturated().to_response();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.header("Retry-After"), Some("1"));
    let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(body["code"], "pool_saturated");
    assert_eq!(body["retry_after_ms"], 1000);
}

#[test]
fn audio_errors_map_to_400_and_415() {
    assert_eq!(ApiError::from(AudioError::Empty).status.as_u16(), 400);
    assert_eq!(
        ApiError::from(AudioError::UnsupportedFormat("x".into()))
            .status
            .as_u16(),
        415
    );
}

#[test]
fn internal_hides_details() {
    let e = ApiError::from(PoolError::Speech(crate::speech::SpeechError::Inference(
        "/secret/path".into(),
    )));
    assert!(!e.body().to_string().contains("secret"));
}
