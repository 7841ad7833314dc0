//! OpenNebula template syntax (opennebula-api.md §1.5) for the 6.x `vm_template_contents`.
//!
//! Values are always double-quoted. Inside quotes only `\"` is an escape, so values that
//! hold `"`, `\` or line breaks are refused instead of escaped (valid specs never have
//! them: every value passed an allow-list).

use super::RenderError;

/// Builds template text one attribute per line.
#[derive(Debug, Default)]
pub(super) struct Template {
    lines: Vec<String>,
}

fn quote(name: &str, v: &str) -> Result<String, RenderError> {
    if v.contains(['"', '\\', '\n', '\r']) {
        return Err(RenderError::UnsafeContextValue(name.to_string()));
    }
    Ok(format!("\"{v}\""))
}

impl Template {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// `NAME = "value"`.
    pub(super) fn single(mut self, name: &str, value: &str) -> Result<Self, RenderError> {
        self.lines.push(format!("{name} = {}", quote(name, value)?));
        Ok(self)
    }

    /// `NAME = [ K1 = "v1", K2 = "v2" ]`.
    pub(super) fn vector(
        mut self,
        name: &str,
        pairs: &[(String, String)],
    ) -> Result<Self, RenderError> {
        let inner: Result<Vec<String>, RenderError> = pairs
            .iter()
            .map(|(k, v)| Ok(format!("{k} = {}", quote(k, v)?)))
            .collect();
        self.lines
            .push(format!("{name} = [ {} ]", inner?.join(", ")));
        Ok(self)
    }

    pub(super) fn finish(self) -> String {
        self.lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_singles_and_vectors_and_refuses_quotes() {
        let t = Template::new()
            .single("CPU", "2")
            .unwrap()
            .vector("NIC", &[("NETWORK_ID".into(), "$Private".into())])
            .unwrap()
            .finish();
        assert_eq!(t, "CPU = \"2\"\nNIC = [ NETWORK_ID = \"$Private\" ]");
        assert!(Template::new().single("X", "a\"b").is_err());
        assert!(Template::new().single("X", "a\nB=1").is_err());
    }
}
