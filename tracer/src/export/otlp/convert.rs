//! Our spans and processes in the SDK's terms: [`SpanData`] and the OTel [`Resource`].

use std::borrow::Cow;

use opentelemetry::{
    InstrumentationScope, KeyValue, StringValue, Value,
    trace::{
        Link, SpanContext, SpanId, SpanKind as OtelSpanKind, Status, TraceFlags, TraceId,
        TraceState,
    },
};
use opentelemetry_sdk::{
    Resource,
    resource::EnvResourceDetector,
    trace::{SpanData, SpanEvents, SpanLinks},
};

use crate::span::model::{
    AttrValue, ContainerIdentity, FinishedSpan, ProcessResource, SpanKind, SpanStatus,
};

/// The OTel resource of one traced process.
pub(crate) fn otel_resource(p: &ProcessResource) -> Resource {
    let service = if p.service_name.is_empty() {
        // The spec's fallback for a missing service.name.
        format!("unknown_service:{}", p.executable_name)
    } else {
        p.service_name.clone()
    };
    let mut attrs = vec![
        KeyValue::new("service.name", service),
        KeyValue::new("process.pid", i64::from(p.pid)),
    ];
    if !p.executable_name.is_empty() {
        attrs.push(KeyValue::new(
            "process.executable.name",
            p.executable_name.clone(),
        ));
    }
    if !p.host_name.is_empty() {
        attrs.push(KeyValue::new("host.name", p.host_name.clone()));
    }
    if let Some(container) = &p.container {
        push_container(&mut attrs, container);
    }
    // OTEL_RESOURCE_ATTRIBUTES adds deployment-wide facts (cluster, environment); what we know
    // about the process comes later and wins. OTEL_SERVICE_NAME is deliberately not applied:
    // one agent exports many services.
    Resource::builder_empty()
        .with_detector(Box::new(EnvResourceDetector::new()))
        .with_attributes(attrs)
        .build()
}

/// `container.*` and `k8s.*` resource attributes, as far as they are known.
fn push_container(attrs: &mut Vec<KeyValue>, c: &ContainerIdentity) {
    if !c.id.is_empty() {
        attrs.push(KeyValue::new("container.id", c.id.clone()));
    }
    if let Some(runtime) = c.runtime {
        attrs.push(KeyValue::new("container.runtime.name", runtime));
    }
    let optional = [
        ("container.name", &c.name),
        ("container.image.name", &c.image_name),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attrs.push(KeyValue::new(key, value.clone()));
        }
    }
    if let Some(tag) = &c.image_tag {
        attrs.push(KeyValue::new(
            "container.image.tags",
            Value::Array(vec![StringValue::from(tag.clone())].into()),
        ));
    }
    if c.id.is_empty() {
        // A plain cgroup selected with --cgroup: its path is all there is to say.
        attrs.push(KeyValue::new(
            "difytrace.cgroup.path",
            c.cgroup_path.clone(),
        ));
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
                attrs.push(KeyValue::new(key, value.clone()));
            }
        }
    }
}

/// The instrumentation scope every exported span carries.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("difytrace")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Converts our span into the SDK's export form. Every span we export was recorded, hence the
/// sampled flag; the span itself is local to the traced process, only its parent can be remote.
pub(crate) fn to_span_data(span: FinishedSpan, scope: &InstrumentationScope) -> SpanData {
    let span_context = SpanContext::new(
        TraceId::from_bytes(span.trace_id),
        SpanId::from_bytes(span.span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    let mut links = SpanLinks::default();
    links.links = span
        .links
        .into_iter()
        .map(|l| {
            Link::new(
                SpanContext::new(
                    TraceId::from_bytes(l.trace_id),
                    SpanId::from_bytes(l.span_id),
                    TraceFlags::SAMPLED,
                    true,
                    TraceState::default(),
                ),
                l.attributes.into_iter().map(key_value).collect(),
                0,
            )
        })
        .collect();
    SpanData {
        span_context,
        parent_span_id: span
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.parent_span_id.is_some() && span.parent_is_remote,
        span_kind: match span.kind {
            SpanKind::Server => OtelSpanKind::Server,
            SpanKind::Client => OtelSpanKind::Client,
            SpanKind::Internal => OtelSpanKind::Internal,
        },
        name: Cow::Owned(span.name),
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes.into_iter().map(key_value).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links,
        status: match span.status {
            SpanStatus::Unset => Status::Unset,
            SpanStatus::Error(description) => Status::Error {
                description: Cow::Owned(description),
            },
        },
        instrumentation_scope: scope.clone(),
    }
}

fn key_value((key, value): (String, AttrValue)) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => Value::String(StringValue::from(s)),
        AttrValue::Int(i) => Value::I64(i),
        AttrValue::Bool(b) => Value::Bool(b),
        AttrValue::F64(f) => Value::F64(f),
        AttrValue::StrList(l) => Value::Array(opentelemetry::Array::String(
            l.into_iter().map(StringValue::from).collect(),
        )),
    };
    KeyValue::new(key, value)
}

#[cfg(test)]
mod container_tests {
    use std::sync::Arc;

    use super::*;
    use crate::span::model::K8sIdentity;

    fn resource_attrs(container: Option<ContainerIdentity>) -> Vec<(String, String)> {
        let r = otel_resource(&ProcessResource {
            service_name: "api".into(),
            pid: 7,
            executable_name: "python3".into(),
            host_name: "node-1".into(),
            container: container.map(Arc::new),
        });
        r.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn container_and_pod_attributes() {
        let id = "5d2e1e6a0f4b4c8e9a7d3b2c1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";
        let attrs = resource_attrs(Some(ContainerIdentity {
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
        let get = |k: &str| {
            attrs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("container.id"), Some(id));
        assert_eq!(get("container.runtime.name"), Some("containerd"));
        assert_eq!(get("container.image.name"), Some("langgenius/dify-api"));
        assert_eq!(get("container.name"), None, "unknown, so absent");
        assert_eq!(get("k8s.pod.name"), Some("api-0"));
        assert_eq!(get("k8s.pod.uid"), Some("u-1"));
        assert_eq!(get("k8s.namespace.name"), Some("dify"));
        assert_eq!(get("k8s.container.name"), Some("api"));
        assert_eq!(get("k8s.node.name"), Some("node-1"));
        assert_eq!(get("difytrace.cgroup.path"), None);
        let plain = resource_attrs(Some(ContainerIdentity {
            cgroup_path: "/my.slice/x".into(),
            ..Default::default()
        }));
        assert!(plain.iter().all(|(k, _)| k != "container.id"));
        assert!(plain.contains(&("difytrace.cgroup.path".into(), "/my.slice/x".into())));
        let host = resource_attrs(None);
        assert!(
            host.iter()
                .all(|(k, _)| !k.starts_with("container.") && !k.starts_with("k8s."))
        );
    }
}
