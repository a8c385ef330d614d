//! The image config the frontend hands to exporters as `containerimage.config`
//! (`exporter/containerimage/image` and `dockerfile2llb/image.go` at v0.11.6).
//!
//! Written exactly as Go's `json.Marshal` writes upstream's `Image` struct, so that the same
//! Dockerfile gives the same config bytes and therefore the same image ID: fields in struct
//! order (the outer `config` after `history`; `Healthcheck`, `ArgsEscaped`, `OnBuild` — always
//! present, `null` when unset — `StopTimeout` and `Shell` after the OCI fields), `omitempty`
//! rules, maps with sorted keys, and Go's HTML-safe string escaping (`<`, `>`, `&`, U+2028 and
//! U+2029 as `\u003c`…). Fields of a base image's config that upstream's struct does not know
//! are dropped on reading, as Go's decoder does.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// `HEALTHCHECK` settings (durations in nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// The test.
    #[serde(
        rename = "Test",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub test: Vec<String>,
    /// Interval.
    #[serde(rename = "Interval", default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    /// Timeout.
    #[serde(rename = "Timeout", default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    /// Start period.
    #[serde(rename = "StartPeriod", default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    /// Retries.
    #[serde(rename = "Retries", default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// `null` reads as the default, as Go's decoder leaves the zero value.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An empty JSON object (`struct{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The runtime config (`image.ImageConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// User.
    #[serde(
        rename = "User",
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub user: String,
    /// Exposed ports (`80/tcp`).
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exposed_ports: Option<BTreeMap<String, Empty>>,
    /// Environment.
    #[serde(
        rename = "Env",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub env: Vec<String>,
    /// Entrypoint.
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub entrypoint: Vec<String>,
    /// Command.
    #[serde(
        rename = "Cmd",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub cmd: Vec<String>,
    /// Volumes.
    #[serde(rename = "Volumes", default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, Empty>>,
    /// Working directory.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub working_dir: String,
    /// Labels.
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Stop signal.
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub stop_signal: String,
    /// Health check.
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcheck: Option<HealthConfig>,
    /// Arguments are escaped (set by CMD).
    #[serde(
        rename = "ArgsEscaped",
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "nullable"
    )]
    pub args_escaped: bool,
    /// ONBUILD triggers (always written; `null` when none).
    #[serde(rename = "OnBuild", default)]
    pub on_build: Option<Vec<String>>,
    /// Stop timeout.
    #[serde(
        rename = "StopTimeout",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_timeout: Option<i64>,
    /// Shell for the shell form.
    #[serde(
        rename = "Shell",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub shell: Vec<String>,
}

/// `rootfs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub typ: String,
    /// Layer diff IDs (`null` when none).
    #[serde(default)]
    pub diff_ids: Option<Vec<String>>,
}

/// One `history` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Creation time (RFC 3339), kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// What made it.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub created_by: String,
    /// Author.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub author: String,
    /// Comment.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub comment: String,
    /// No layer.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "nullable"
    )]
    pub empty_layer: bool,
}

/// The image config document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Creation time (dropped from base images, as upstream does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `MAINTAINER`.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub author: String,
    /// Architecture.
    #[serde(default, deserialize_with = "nullable")]
    pub architecture: String,
    /// Variant.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub variant: String,
    /// OS.
    #[serde(default, deserialize_with = "nullable")]
    pub os: String,
    /// OS version.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "nullable"
    )]
    pub os_version: String,
    /// OS features.
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub os_features: Vec<String>,
    /// Root filesystem.
    #[serde(default, deserialize_with = "nullable")]
    pub rootfs: RootFs,
    /// History.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub history: Vec<History>,
    /// Runtime config.
    #[serde(default, deserialize_with = "nullable")]
    pub config: ImageConfig,
}

/// Go's `system.DefaultPathEnv` for Linux.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Go's `system.DefaultPathEnv` for Windows.
pub const DEFAULT_PATH_WINDOWS: &str = "c:\\Windows\\System32;c:\\Windows";

/// Go's `system.DefaultPathEnv(os)`: the `PATH` an image of `os` starts with.
pub fn default_path(os: &str) -> &'static str {
    if os == "windows" {
        DEFAULT_PATH_WINDOWS
    } else {
        DEFAULT_PATH
    }
}

impl Image {
    /// `emptyImage`: the config of `FROM scratch`.
    pub fn empty(os: &str, architecture: &str, variant: &str) -> Image {
        Image {
            architecture: architecture.into(),
            os: os.into(),
            variant: variant.into(),
            rootfs: RootFs {
                typ: "layers".into(),
                diff_ids: None,
            },
            config: ImageConfig {
                working_dir: "/".into(),
                env: vec![format!("PATH={}", default_path(os))],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Go's `json.Marshal` of the document.
    pub fn to_go_json(&self) -> Vec<u8> {
        go_json(self)
    }
}

/// Go's `json.Marshal` of a serializable value: HTML-safe escapes and Go's control escapes.
pub fn go_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
    v.serialize(&mut ser)
        .expect("serializing to memory cannot fail");
    out
}

struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let esc = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(esc.as_bytes())?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        use serde_json::ser::CharEscape::*;
        let s = match escape {
            Quote => "\\\"".to_string(),
            ReverseSolidus => "\\\\".to_string(),
            LineFeed => "\\n".to_string(),
            CarriageReturn => "\\r".to_string(),
            Tab => "\\t".to_string(),
            Backspace => "\\u0008".to_string(),
            FormFeed => "\\u000c".to_string(),
            Solidus => "/".to_string(),
            AsciiControl(b) => format!("\\u{b:04x}"),
        };
        writer.write_all(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_image_as_go_writes_it() {
        let img = Image::empty("linux", "amd64", "");
        assert_eq!(
            String::from_utf8(img.to_go_json()).unwrap(),
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":null},"config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/","OnBuild":null}}"#
        );
    }

    #[test]
    fn html_escapes_and_unknown_fields() {
        let base = br#"{"architecture":"amd64","os":"linux","container":"x","created":"2020-01-01T00:00:00Z","config":{"Hostname":"","Env":null,"Cmd":["sh","-c","a && b <c>"],"Image":"sha256:1","OnBuild":null,"Labels":null},"rootfs":{"type":"layers","diff_ids":["sha256:a"]}}"#;
        let img: Image = serde_json::from_slice(base).unwrap();
        let out = String::from_utf8(img.to_go_json()).unwrap();
        assert_eq!(
            out,
            r#"{"created":"2020-01-01T00:00:00Z","architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:a"]},"config":{"Cmd":["sh","-c","a \u0026\u0026 b \u003cc\u003e"],"OnBuild":null}}"#
        );
    }
}
