use super::*;

fn field(name: &str, value: &str) -> Part {
    let data = value.as_bytes().to_vec();
    Part {
        name: name.into(),
        filename: None,
        content_type: None,
        data,
    }
}

fn file() -> Part {
    Part {
        filename: Some("a.wav".into()),
        ..field("file", "RIFF")
    }
}

/// A file then `fields`, checked.
fn try_form(fields: &[(&str, &str)]) -> Result<Form, OpenAiError> {
    let parts = fields.iter().map(|(n, v)| field(n, v));
    parse_form(std::iter::once(file()).chain(parts).collect())
}

fn form(fields: &[(&str, &str)]) -> Form {
    try_form(fields).unwrap()
}

/// Status and `param` of the refusal of `fields`.
fn refusal(fields: &[(&str, &str)]) -> (u16, Option<String>) {
    let e = try_form(fields).unwrap_err();
    (e.error.status.as_u16(), e.param)
}

#[test]
fn defaults_are_json_with_segments_and_no_stream() {
    let form = form(&[("model", "whisper-1"), ("temperature", "0")]);
    assert_eq!(form.format, Format::Json);
    assert!(!form.words && form.segments && !form.stream);
    assert_eq!(form.file, b"RIFF");
}

#[test]
fn file_is_required_and_must_be_a_file_part() {
    let missing = parse_form(vec![field("model", "x")]).unwrap_err();
    assert_eq!(missing.param.as_deref(), Some("file"));
    let not_a_file = parse_form(vec![field("file", "x")]).unwrap_err();
    assert_eq!(not_a_file.param.as_deref(), Some("file"));
    let mut elsewhere = file();
    elsewhere.name = "audio".into();
    let e = parse_form(vec![elsewhere]).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("audio"));
}

#[test]
fn language_accepts_russian_only() {
    for ok in ["ru", "RU", "Russian", "", " ru "] {
        form(&[("language", ok)]);
    }
    assert_eq!(
        refusal(&[("language", "en")]),
        (400, Some("language".into()))
    );
}

#[test]
fn response_formats_parse_strictly() {
    for f in Format::ALL {
        assert_eq!(form(&[("response_format", f.name())]).format, f);
    }
    let wanted = (400, Some("response_format".into()));
    assert_eq!(refusal(&[("response_format", "txt")]), wanted);
}

#[test]
fn granularities_need_verbose_json_and_pick_lists() {
    let (verbose, g) = (
        ("response_format", "verbose_json"),
        "timestamp_granularities[]",
    );
    let words = form(&[verbose, (g, "word")]);
    assert!(words.words && !words.segments);
    let both = form(&[verbose, (g, "word"), (g, "segment")]);
    assert!(both.words && both.segments);
    let wanted = (400, Some(g.to_owned()));
    assert_eq!(refusal(&[(g, "word")]), wanted);
    assert_eq!(refusal(&[verbose, (g, "char")]), wanted);
}

#[test]
fn stream_is_a_bool_for_json_or_text_only() {
    assert!(form(&[("stream", "true")]).stream);
    assert!(form(&[("response_format", "text"), ("stream", "True")]).stream);
    let wanted = (400, Some("stream".into()));
    assert_eq!(refusal(&[("stream", "yes")]), wanted);
    assert_eq!(
        refusal(&[("response_format", "srt"), ("stream", "true")]),
        wanted
    );
}

#[test]
fn only_list_fields_may_repeat() {
    assert_eq!(
        refusal(&[("model", "a"), ("model", "b")]),
        (400, Some("model".into()))
    );
    form(&[("include[]", "logprobs"), ("include[]", "x")]);
}

#[test]
fn errors_have_openai_shape() {
    let body = OpenAiError::invalid("language", "unsupported_language", "no").body();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "language");
    assert_eq!(body["error"]["code"], "unsupported_language");
    let busy = OpenAiError::from(ApiError::saturated());
    assert_eq!(busy.body()["error"]["type"], "server_error");
    assert!(busy.body()["error"]["param"].is_null());
    assert_eq!(busy.to_response().header("Retry-After"), Some("1"));
}
