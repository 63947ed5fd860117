//! Kubernetes tooling for the tests of `deploy/`: kubeconform and helm (installed by
//! `cargo xtask setup --with-test-deps` into `$(go env GOPATH)/bin`), and the JSON schemas
//! kubeconform validates against.
//!
//! kubeconform fetches its schemas from GitHub by default, which neither this machine nor CI
//! reaches. So the schemas are generated here from the OpenAPI (swagger 2.0) spec of a
//! Kubernetes release, `api/openapi-spec/swagger.json` of the module `k8s.io/kubernetes`
//! (fetched through the Go module proxy by `go mod download`), into kubeconform's
//! "standalone strict" layout under `target/kube-schemas`: one file per kind, with every
//! definition it refers to embedded, and no unknown fields allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::workspace_root;

/// The Kubernetes release whose API the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.37.2";

/// `$(go env GOPATH)/bin` (first entry), where `go install` puts kubeconform and helm.
pub fn go_bin_dir() -> Result<PathBuf> {
    let out = Command::new("go")
        .args(["env", "GOPATH"])
        .output()
        .context("running `go env GOPATH` (Go is needed for kubeconform and helm)")?;
    if !out.status.success() {
        bail!(
            "`go env GOPATH` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .trim()
        .split(':')
        .next()
        .filter(|p| !p.is_empty())
        .context("`go env GOPATH` is empty")?;
    Ok(Path::new(first).join("bin"))
}

/// A tool: `$<env>` when set, else `$(go env GOPATH)/bin/<name>`; `None` when absent.
pub fn tool(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = go_bin_dir().ok()?.join(name);
    p.is_file().then_some(p)
}

/// kubeconform (`DIFYTRACE_KUBECONFORM` overrides).
pub fn kubeconform() -> Option<PathBuf> {
    tool("kubeconform", "DIFYTRACE_KUBECONFORM")
}

/// helm (`DIFYTRACE_HELM` overrides).
pub fn helm() -> Option<PathBuf> {
    tool("helm", "DIFYTRACE_HELM")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `swagger.json` of `k8s.io/kubernetes@v<version>`, downloaded into the Go module cache
/// (about 20 MB the first time; a no-op afterwards).
pub fn openapi_spec(version: &str) -> Result<PathBuf> {
    let module = format!("k8s.io/kubernetes@v{version}");
    let out = Command::new("go")
        .args(["mod", "download", "-json", &module])
        // outside any module, so no go.mod around decides anything
        .current_dir(std::env::temp_dir())
        .output()
        .with_context(|| format!("running `go mod download -json {module}`"))?;
    if !out.status.success() {
        bail!(
            "`go mod download {module}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `go mod download -json {module}` output"))?;
    let dir = info
        .get("Dir")
        .and_then(Value::as_str)
        .with_context(|| format!("`go mod download -json {module}` names no Dir"))?;
    let spec = Path::new(dir).join("api/openapi-spec/swagger.json");
    if !spec.is_file() {
        bail!("{} is missing from {module}", spec.display());
    }
    Ok(spec)
}

/// The directory to pass as kubeconform's schema location root for `version`: generated
/// once, reused while its `complete` marker is there.
pub fn schema_root(version: &str) -> Result<PathBuf> {
    // the tests of one binary run in parallel by default: one generates, the others wait
    static GENERATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = GENERATING.lock().unwrap_or_else(|p| p.into_inner());
    let root = target_dir().join("kube-schemas");
    let dir = root.join(format!("v{version}-standalone-strict"));
    let marker = dir.join("complete");
    if marker.is_file() {
        return Ok(root);
    }
    let spec_path = openapi_spec(version)?;
    let text =
        std::fs::read(&spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec: Value = serde_json::from_slice(&text)
        .with_context(|| format!("parsing {}", spec_path.display()))?;
    let schemas = standalone_schemas(&spec)?;
    // written next to the final place and renamed, so a killed run leaves no half set
    let tmp = root.join(format!(".v{version}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (name, schema) in &schemas {
        let path = tmp.join(name);
        std::fs::write(&path, serde_json::to_vec(schema)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(tmp.join("complete"), format!("{} kinds\n", schemas.len()))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    Ok(root)
}

/// kubeconform's file name for a kind: `<kind>-<first label of group>-<version>.json`, the
/// group left out for the core group (`daemonset-apps-v1.json`, `pod-v1.json`,
/// `clusterrole-rbac-v1.json`).
pub fn schema_file_name(group: &str, version: &str, kind: &str) -> String {
    let kind = kind.to_lowercase();
    let version = version.to_lowercase();
    match group.split('.').next().filter(|g| !g.is_empty()) {
        Some(g) => format!("{kind}-{}-{version}.json", g.to_lowercase()),
        None => format!("{kind}-{version}.json"),
    }
}

/// One standalone strict JSON schema per kind (group, version, kind) of a swagger 2.0 spec:
/// the kind's definition at the root, the definitions it reaches under `definitions`,
/// `additionalProperties: false` on every object that lists its properties, `apiVersion`
/// and `kind` pinned to the kind's own, and the string-or-number types Kubernetes accepts
/// (IntOrString, Quantity) widened to what their YAML may hold.
pub fn standalone_schemas(spec: &Value) -> Result<BTreeMap<String, Value>> {
    let defs = spec
        .get("definitions")
        .and_then(Value::as_object)
        .context("the OpenAPI spec has no definitions")?;
    let mut out = BTreeMap::new();
    for (name, def) in defs {
        let Some(gvks) = def
            .get("x-kubernetes-group-version-kind")
            .and_then(Value::as_array)
        else {
            continue;
        };
        // Types shared by many kinds (DeleteOptions, WatchEvent...) are no manifests.
        if gvks.len() != 1 {
            continue;
        }
        let gvk = &gvks[0];
        let field = |k: &str| gvk.get(k).and_then(Value::as_str).unwrap_or_default();
        let (group, version, kind) = (field("group"), field("version"), field("kind"));
        if version.is_empty() || kind.is_empty() {
            continue;
        }
        let mut reached = BTreeSet::new();
        collect_refs(def, defs, &mut reached)?;
        let mut embedded = Map::new();
        for r in &reached {
            embedded.insert(r.clone(), strict(&defs[r.as_str()], r));
        }
        let mut root = strict(def, name);
        let api_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert(
                "apiVersion".into(),
                json!({"type": "string", "enum": [api_version]}),
            );
            props.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
        }
        if let Some(obj) = root.as_object_mut() {
            obj.insert("required".into(), required_with_type(obj.get("required")));
            obj.insert("definitions".into(), Value::Object(embedded));
        }
        out.insert(schema_file_name(group, version, kind), root);
    }
    if out.is_empty() {
        bail!("no kinds (x-kubernetes-group-version-kind) in the OpenAPI spec");
    }
    Ok(out)
}

fn required_with_type(existing: Option<&Value>) -> Value {
    let mut names: Vec<String> = existing
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for n in ["apiVersion", "kind"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    json!(names)
}

const REF_PREFIX: &str = "#/definitions/";

/// Names of every definition `schema` reaches through `$ref`, transitively.
fn collect_refs(
    schema: &Value,
    defs: &Map<String, Value>,
    reached: &mut BTreeSet<String>,
) -> Result<()> {
    match schema {
        Value::Object(obj) => {
            if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
                let name = r
                    .strip_prefix(REF_PREFIX)
                    .with_context(|| format!("unsupported $ref {r}"))?;
                let target = defs
                    .get(name)
                    .with_context(|| format!("$ref to a missing definition {name}"))?;
                if reached.insert(name.to_string()) {
                    collect_refs(target, defs, reached)?;
                }
            }
            for v in obj.values() {
                collect_refs(v, defs, reached)?;
            }
        }
        Value::Array(items) => {
            for v in items {
                collect_refs(v, defs, reached)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The definition `name` as a strict JSON schema (see [`standalone_schemas`]).
fn strict(schema: &Value, name: &str) -> Value {
    // Kubernetes takes `port: 8080` and `port: http`, `cpu: 1` and `cpu: 100m`; the spec
    // only says "string" with a format.
    match name {
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => {
            return json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
        }
        "io.k8s.apimachinery.pkg.api.resource.Quantity" => {
            return json!({"oneOf": [{"type": "string"}, {"type": "number"}]});
        }
        _ => {}
    }
    strict_node(schema)
}

fn strict_node(schema: &Value) -> Value {
    match schema {
        Value::Object(obj) => {
            let mut out = Map::new();
            for (k, v) in obj {
                // `properties` maps field names to schemas: its keys are no keywords.
                let v = if k == "properties" {
                    match v {
                        Value::Object(props) => Value::Object(
                            props
                                .iter()
                                .map(|(p, s)| (p.clone(), strict_node(s)))
                                .collect(),
                        ),
                        other => other.clone(),
                    }
                } else {
                    strict_node(v)
                };
                out.insert(k.clone(), v);
            }
            if out.contains_key("properties") && !out.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(strict_node).collect()),
        other => other.clone(),
    }
}

/// What kubeconform said about a set of files.
#[derive(Debug)]
pub struct Validation {
    pub success: bool,
    /// (kind, name, status, message) per resource: status is `statusValid`,
    /// `statusInvalid`, `statusError` or `statusSkipped`.
    pub resources: Vec<(String, String, String, String)>,
    pub output: String,
}

impl Validation {
    pub fn valid_kinds(&self) -> Vec<String> {
        self.resources
            .iter()
            .filter(|r| r.2 == "statusValid")
            .map(|r| r.0.clone())
            .collect()
    }
}

/// Runs kubeconform in strict mode against the generated schemas on `files` (YAML files or
/// `-` for stdin given as `stdin`).
pub fn kubeconform_validate(
    kubeconform: &Path,
    files: &[PathBuf],
    stdin: Option<&str>,
) -> Result<Validation> {
    let root = schema_root(KUBERNETES_VERSION)?;
    let location = format!(
        "{}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        root.display()
    );
    let mut cmd = Command::new(kubeconform);
    cmd.args(["-strict", "-summary", "-verbose", "-output", "json"])
        .args(["-kubernetes-version", KUBERNETES_VERSION])
        .arg("-schema-location")
        .arg(&location)
        .args(files);
    let out = match stdin {
        None => cmd.output(),
        Some(text) => {
            use std::io::Write;
            cmd.arg("-")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn()?;
            child
                .stdin
                .take()
                .context("kubeconform stdin")?
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        }
    }
    .with_context(|| format!("running {}", kubeconform.display()))?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("kubeconform printed no JSON report:\n{output}"))?;
    let resources = report
        .get("resources")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    (s("kind"), s("name"), s("status"), s("msg"))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Validation {
        success: out.status.success(),
        resources,
        output,
    })
}

/// `helm template <release> <chart> --namespace <ns>` with `--set` pairs (use `--set-json`
/// style values through `set_json`), returning the rendered YAML.
pub fn helm_template(
    helm: &Path,
    chart: &Path,
    release: &str,
    namespace: &str,
    set: &[(&str, &str)],
    set_json: &[(&str, &str)],
) -> Result<String> {
    // helm wants somewhere to keep its (unused here) repository config and cache
    let home = target_dir().join("helm-home");
    let mut cmd = Command::new(helm);
    cmd.args(["template", release])
        .arg(chart)
        .args(["--namespace", namespace])
        // a `go install`ed helm assumes Kubernetes 1.20 (no version stamped in), which the
        // chart's kubeVersion refuses
        .args(["--kube-version", KUBERNETES_VERSION])
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    for (k, v) in set {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    for (k, v) in set_json {
        cmd.arg("--set-json").arg(format!("{k}={v}"));
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !out.status.success() {
        bail!(
            "helm template failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("helm printed non-UTF-8")
}

/// The YAML documents of a multi-document stream, as JSON values (empty documents left out).
pub fn yaml_documents(text: &str) -> Result<Vec<Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("parsing YAML")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_follow_kubeconform() {
        assert_eq!(
            schema_file_name("apps", "v1", "DaemonSet"),
            "daemonset-apps-v1.json"
        );
        assert_eq!(schema_file_name("", "v1", "Pod"), "pod-v1.json");
        assert_eq!(
            schema_file_name("rbac.authorization.k8s.io", "v1", "ClusterRole"),
            "clusterrole-rbac-v1.json"
        );
    }

    #[test]
    fn schemas_embed_refs_and_forbid_unknown_fields() {
        let spec = json!({"definitions": {
            "a.Thing": {
                "type": "object",
                "x-kubernetes-group-version-kind": [{"group": "apps", "version": "v1", "kind": "Thing"}],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "spec": {"$ref": "#/definitions/a.Spec"}
                }
            },
            "a.Spec": {"type": "object", "properties": {
                "port": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
                "free": {"type": "object", "additionalProperties": {"type": "string"}}
            }},
            "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
            "a.Unused": {"type": "object", "properties": {"x": {"type": "string"}}}
        }});
        let out = standalone_schemas(&spec).unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["thing-apps-v1.json"]);
        let s = &out["thing-apps-v1.json"];
        assert_eq!(s["additionalProperties"], json!(false));
        assert_eq!(s["properties"]["apiVersion"]["enum"], json!(["apps/v1"]));
        assert_eq!(s["properties"]["kind"]["enum"], json!(["Thing"]));
        assert_eq!(s["required"], json!(["apiVersion", "kind"]));
        let defs = s["definitions"].as_object().unwrap();
        assert!(defs.contains_key("a.Spec") && !defs.contains_key("a.Unused"));
        assert_eq!(defs["a.Spec"]["additionalProperties"], json!(false));
        // a free-form map keeps its own additionalProperties
        assert_eq!(
            defs["a.Spec"]["properties"]["free"]["additionalProperties"],
            json!({"type": "string"})
        );
        assert_eq!(
            defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["oneOf"][1],
            json!({"type": "integer"})
        );
    }

    #[test]
    fn a_dangling_ref_is_an_error() {
        let spec = json!({"definitions": {"a.T": {
            "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "T"}],
            "properties": {"s": {"$ref": "#/definitions/missing"}}
        }}});
        let err = standalone_schemas(&spec).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }
}
