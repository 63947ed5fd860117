//! Our spans and processes as OTLP protobuf: [`span`] moves a [`FinishedSpan`] into the
//! proto `Span` (its strings are moved, not copied), [`resource`] builds a process's proto
//! `Resource` (once per process), and [`encode_request`] writes an
//! `ExportTraceServiceRequest` straight from borrowed spans, so spans stay queued (and can be
//! sent again) until the backend has accepted them.

use std::time::SystemTime;

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{
        Span, SpanFlags, Status,
        span::{Link, SpanKind as ProtoKind},
        status::StatusCode,
    },
};
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::span::model::{
    AttrValue, ContainerIdentity, FinishedSpan, ProcessResource, SpanKind, SpanLink, SpanStatus,
};

/// W3C trace flags: every span we export was recorded.
const SAMPLED: u32 = 0x01;
const HAS_IS_REMOTE: u32 = SpanFlags::ContextHasIsRemoteMask as u32;
const IS_REMOTE: u32 = SpanFlags::ContextIsRemoteMask as u32;

/// The instrumentation scope every exported span carries.
pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "difytrace".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

fn kv(key: impl Into<String>, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.to_string()))
}

/// The OTel resource of one traced process. `env_attrs` (OTEL_RESOURCE_ATTRIBUTES, parsed)
/// adds deployment-wide facts (cluster, environment); what we know about the process wins
/// over them. OTEL_SERVICE_NAME is deliberately not applied: one agent exports many services.
pub(super) fn resource(p: &ProcessResource, env_attrs: &[(String, String)]) -> Resource {
    let service = if p.service_name.is_empty() {
        // The spec's fallback for a missing service.name.
        format!("unknown_service:{}", p.executable_name)
    } else {
        p.service_name.clone()
    };
    let mut attrs = vec![
        kv("service.name", any_value::Value::StringValue(service)),
        kv("process.pid", any_value::Value::IntValue(i64::from(p.pid))),
    ];
    if !p.executable_name.is_empty() {
        attrs.push(text("process.executable.name", &p.executable_name));
    }
    if !p.host_name.is_empty() {
        attrs.push(text("host.name", &p.host_name));
    }
    if let Some(container) = &p.container {
        push_container(&mut attrs, container);
    }
    let ours = attrs.len();
    for (key, value) in env_attrs {
        if attrs[..ours].iter().any(|a| &a.key == key) {
            continue;
        }
        // A key repeated in the variable: the last one counts.
        match attrs[ours..].iter_mut().find(|a| &a.key == key) {
            Some(existing) => *existing = text(key, value),
            None => attrs.push(text(key, value)),
        }
    }
    Resource {
        attributes: attrs,
        ..Default::default()
    }
}

/// `container.*` and `k8s.*` resource attributes, as far as they are known.
fn push_container(attrs: &mut Vec<KeyValue>, c: &ContainerIdentity) {
    if !c.id.is_empty() {
        attrs.push(text("container.id", &c.id));
    }
    if let Some(runtime) = c.runtime {
        attrs.push(text("container.runtime.name", runtime));
    }
    let optional = [
        ("container.name", &c.name),
        ("container.image.name", &c.image_name),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attrs.push(text(key, value));
        }
    }
    if let Some(tag) = &c.image_tag {
        attrs.push(kv(
            "container.image.tags",
            any_value::Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(any_value::Value::StringValue(tag.clone())),
                }],
            }),
        ));
    }
    if c.id.is_empty() {
        // A plain cgroup selected with --cgroup: its path is all there is to say.
        attrs.push(text("difytrace.cgroup.path", &c.cgroup_path));
    }
    if let Some(k8s) = &c.k8s {
        for (key, value) in [
            ("k8s.pod.name", &k8s.pod_name),
            ("k8s.pod.uid", &k8s.pod_uid),
            ("k8s.namespace.name", &k8s.namespace),
            ("k8s.container.name", &k8s.container_name),
            ("k8s.node.name", &k8s.node_name),
        ] {
            if !value.is_empty() {
                attrs.push(text(key, value));
            }
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn attribute((key, value): (String, AttrValue)) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
        AttrValue::Bool(b) => any_value::Value::BoolValue(b),
        AttrValue::F64(f) => any_value::Value::DoubleValue(f),
        AttrValue::StrList(l) => any_value::Value::ArrayValue(ArrayValue {
            values: l
                .into_iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s)),
                })
                .collect(),
        }),
    };
    kv(key, value)
}

/// A link's context came from another process (a traceparent header), hence remote.
fn link(l: SpanLink) -> Link {
    Link {
        trace_id: l.trace_id.to_vec(),
        span_id: l.span_id.to_vec(),
        attributes: l.attributes.into_iter().map(attribute).collect(),
        flags: SAMPLED | HAS_IS_REMOTE | IS_REMOTE,
        ..Default::default()
    }
}

/// Our span as the proto `Span`. The span itself is local to the traced process; only its
/// parent can be remote, which the flags say.
pub(super) fn span(s: FinishedSpan) -> Span {
    let remote_parent = s.parent_span_id.is_some() && s.parent_is_remote;
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: SAMPLED | HAS_IS_REMOTE | if remote_parent { IS_REMOTE } else { 0 },
        name: s.name,
        kind: match s.kind {
            SpanKind::Server => ProtoKind::Server,
            SpanKind::Client => ProtoKind::Client,
            SpanKind::Internal => ProtoKind::Internal,
        } as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes: s.attributes.into_iter().map(attribute).collect(),
        links: s.links.into_iter().map(link).collect(),
        // An unset status is the default: no field needed.
        status: match s.status {
            SpanStatus::Unset => None,
            SpanStatus::Error(message) => Some(Status {
                message,
                code: StatusCode::Error as i32,
            }),
        },
        ..Default::default()
    }
}

/// Length-delimited field header plus body length.
fn field_len(tag: u32, body: usize) -> usize {
    key_len(tag) + encoded_len_varint(body as u64) + body
}

fn begin_field(tag: u32, body: usize, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(body as u64, out);
}

/// Appends to `out` an `ExportTraceServiceRequest` with one `ResourceSpans` per group, each
/// holding one `ScopeSpans` of `scope`. Equivalent to building the request and encoding it,
/// without moving the spans into it.
pub(super) fn encode_request(
    scope: &InstrumentationScope,
    groups: &[(&Resource, Vec<&Span>)],
    out: &mut Vec<u8>,
) {
    // ExportTraceServiceRequest.resource_spans = 1; ResourceSpans.resource = 1,
    // .scope_spans = 2; ScopeSpans.scope = 1, .spans = 2.
    let scope_len = field_len(1, scope.encoded_len());
    for (resource, spans) in groups {
        let span_lens: Vec<usize> = spans.iter().map(|s| s.encoded_len()).collect();
        let scope_spans_len = scope_len + span_lens.iter().map(|&l| field_len(2, l)).sum::<usize>();
        let resource_spans_len =
            field_len(1, resource.encoded_len()) + field_len(2, scope_spans_len);
        out.reserve(field_len(1, resource_spans_len));
        begin_field(1, resource_spans_len, out);
        begin_field(1, resource.encoded_len(), out);
        resource.encode_raw(out);
        begin_field(2, scope_spans_len, out);
        begin_field(1, scope.encoded_len(), out);
        scope.encode_raw(out);
        for (span, len) in spans.iter().zip(span_lens) {
            begin_field(2, len, out);
            span.encode_raw(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        trace::v1::{ResourceSpans, ScopeSpans},
    };

    use super::*;
    use crate::span::model::K8sIdentity;

    fn sample() -> FinishedSpan {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_628_401_123_456_789);
        FinishedSpan {
            trace_id: *b"0123456789abcdef",
            span_id: *b"spanid01",
            parent_span_id: Some(*b"parent01"),
            parent_is_remote: true,
            kind: SpanKind::Client,
            name: "POST /v1/sandbox/run".into(),
            start,
            end: start + Duration::from_micros(12_345),
            attributes: vec![
                ("http.request.method".into(), AttrValue::Str("POST".into())),
                ("http.response.status_code".into(), AttrValue::Int(200)),
                ("dify.streamed".into(), AttrValue::Bool(true)),
                ("gen_ai.temperature".into(), AttrValue::F64(0.5)),
                (
                    "gen_ai.response.finish_reasons".into(),
                    AttrValue::StrList(vec!["stop".into()]),
                ),
            ],
            links: vec![SpanLink {
                trace_id: [7; 16],
                span_id: [8; 8],
                attributes: vec![("link.reason".into(), AttrValue::Str("traceparent".into()))],
            }],
            status: SpanStatus::Error("boom".into()),
            resource: Arc::new(ProcessResource {
                service_name: "sandbox".into(),
                pid: 42,
                executable_name: "sandbox".into(),
                host_name: "node-1".into(),
                container: None,
            }),
        }
    }

    fn get<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    #[test]
    fn span_fields_links_and_status() {
        let p = span(sample());
        assert_eq!(p.trace_id, b"0123456789abcdef");
        assert_eq!(p.span_id, b"spanid01");
        assert_eq!(p.parent_span_id, b"parent01");
        assert_eq!(p.flags, 0x01 | 0x100 | 0x200, "sampled, remote parent");
        assert_eq!(p.kind, ProtoKind::Client as i32);
        assert_eq!(p.name, "POST /v1/sandbox/run");
        assert_eq!(p.start_time_unix_nano, 1_795_628_401_123_456_789);
        assert_eq!(p.end_time_unix_nano, 1_795_628_401_135_801_789);
        assert_eq!(get(&p.attributes, "http.request.method"), Some(&s("POST")));
        assert_eq!(
            get(&p.attributes, "http.response.status_code"),
            Some(&any_value::Value::IntValue(200))
        );
        assert_eq!(
            get(&p.attributes, "dify.streamed"),
            Some(&any_value::Value::BoolValue(true))
        );
        assert_eq!(
            get(&p.attributes, "gen_ai.temperature"),
            Some(&any_value::Value::DoubleValue(0.5))
        );
        assert_eq!(
            get(&p.attributes, "gen_ai.response.finish_reasons"),
            Some(&any_value::Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(s("stop"))
                }]
            }))
        );
        assert_eq!(p.links.len(), 1);
        let l = &p.links[0];
        assert_eq!(
            (l.trace_id.as_slice(), l.span_id.as_slice()),
            (&[7; 16][..], &[8; 8][..])
        );
        assert_eq!(l.flags, 0x01 | 0x100 | 0x200, "sampled, remote");
        assert_eq!(get(&l.attributes, "link.reason"), Some(&s("traceparent")));
        let status = p.status.expect("status");
        assert_eq!(
            (status.code, status.message.as_str()),
            (StatusCode::Error as i32, "boom")
        );
    }

    #[test]
    fn root_span_has_no_parent_and_no_status() {
        let mut root = sample();
        root.parent_span_id = None;
        root.kind = SpanKind::Server;
        root.status = SpanStatus::Unset;
        let p = span(root);
        assert!(p.parent_span_id.is_empty());
        assert_eq!(p.flags, 0x01 | 0x100, "known not remote");
        assert_eq!(p.kind, ProtoKind::Server as i32);
        assert_eq!(p.status, None);
        let mut local = sample();
        local.parent_is_remote = false;
        assert_eq!(span(local).flags, 0x01 | 0x100);
    }

    #[test]
    fn resource_attributes() {
        let env = [
            ("deployment.environment".to_string(), "prod".to_string()),
            ("service.name".to_string(), "from-env".to_string()),
            ("k8s.cluster.name".to_string(), "a".to_string()),
            ("k8s.cluster.name".to_string(), "b".to_string()),
        ];
        let r = resource(&sample().resource, &env);
        let a = &r.attributes;
        assert_eq!(get(a, "service.name"), Some(&s("sandbox")), "ours win");
        assert_eq!(get(a, "process.pid"), Some(&any_value::Value::IntValue(42)));
        assert_eq!(get(a, "process.executable.name"), Some(&s("sandbox")));
        assert_eq!(get(a, "host.name"), Some(&s("node-1")));
        assert_eq!(get(a, "deployment.environment"), Some(&s("prod")));
        assert_eq!(get(a, "k8s.cluster.name"), Some(&s("b")));
        assert_eq!(a.len(), 6, "no key twice: {a:?}");
        let nameless = resource(
            &ProcessResource {
                service_name: String::new(),
                pid: 1,
                executable_name: "gunicorn".into(),
                host_name: String::new(),
                container: None,
            },
            &[],
        );
        assert_eq!(
            get(&nameless.attributes, "service.name"),
            Some(&s("unknown_service:gunicorn"))
        );
        assert_eq!(get(&nameless.attributes, "host.name"), None);
    }

    fn container_attrs(container: Option<ContainerIdentity>) -> Vec<KeyValue> {
        resource(
            &ProcessResource {
                service_name: "api".into(),
                pid: 7,
                executable_name: "python3".into(),
                host_name: "node-1".into(),
                container: container.map(Arc::new),
            },
            &[],
        )
        .attributes
    }

    #[test]
    fn container_and_pod_attributes() {
        let id = "5d2e1e6a0f4b4c8e9a7d3b2c1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";
        let attrs = container_attrs(Some(ContainerIdentity {
            id: id.into(),
            runtime: Some("containerd"),
            cgroup_path: format!("/kubepods/pod1/{id}"),
            name: None,
            image_name: Some("langgenius/dify-api".into()),
            image_tag: Some("1.4.0".into()),
            k8s: Some(K8sIdentity {
                pod_name: "api-0".into(),
                pod_uid: "u-1".into(),
                namespace: "dify".into(),
                container_name: "api".into(),
                node_name: "node-1".into(),
            }),
        }));
        let text = |k: &str| match get(&attrs, k) {
            Some(any_value::Value::StringValue(v)) => Some(v.as_str()),
            _ => None,
        };
        assert_eq!(text("container.id"), Some(id));
        assert_eq!(text("container.runtime.name"), Some("containerd"));
        assert_eq!(text("container.image.name"), Some("langgenius/dify-api"));
        assert_eq!(text("container.name"), None, "unknown, so absent");
        assert_eq!(text("k8s.pod.name"), Some("api-0"));
        assert_eq!(text("k8s.pod.uid"), Some("u-1"));
        assert_eq!(text("k8s.namespace.name"), Some("dify"));
        assert_eq!(text("k8s.container.name"), Some("api"));
        assert_eq!(text("k8s.node.name"), Some("node-1"));
        assert_eq!(text("difytrace.cgroup.path"), None);
        assert!(matches!(
            get(&attrs, "container.image.tags"),
            Some(any_value::Value::ArrayValue(a)) if a.values.len() == 1
        ));
        let plain = container_attrs(Some(ContainerIdentity {
            cgroup_path: "/my.slice/x".into(),
            ..Default::default()
        }));
        assert!(plain.iter().all(|kv| kv.key != "container.id"));
        assert_eq!(
            get(&plain, "difytrace.cgroup.path"),
            Some(&s("/my.slice/x"))
        );
        let host = container_attrs(None);
        assert!(
            host.iter()
                .all(|kv| !kv.key.starts_with("container.") && !kv.key.starts_with("k8s."))
        );
    }

    /// The hand-written encoding is byte for byte what prost makes of the built request.
    #[test]
    fn request_encoding_matches_prost() {
        let r1 = resource(&sample().resource, &[]);
        let mut other = (*sample().resource).clone();
        other.pid = 43;
        let r2 = resource(&other, &[("a".into(), "b".into())]);
        let spans: Vec<Span> = (0..3)
            .map(|i| {
                let mut f = sample();
                f.span_id = [i; 8];
                span(f)
            })
            .collect();
        let scope = scope();
        let mut out = Vec::new();
        encode_request(
            &scope,
            &[(&r1, vec![&spans[0], &spans[2]]), (&r2, vec![&spans[1]])],
            &mut out,
        );
        let built = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(r1.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(scope.clone()),
                        spans: vec![spans[0].clone(), spans[2].clone()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceSpans {
                    resource: Some(r2.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(scope.clone()),
                        spans: vec![spans[1].clone()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        assert_eq!(out, built.encode_to_vec());
        assert_eq!(
            ExportTraceServiceRequest::decode(out.as_slice()).expect("decodes"),
            built
        );
    }
}
