//! The job command template (`job.command`): an argv with `{placeholders}`.

use serde::Serialize;

/// The placeholders a job command may use.
pub const JOB_PLACEHOLDERS: &[&str] = &["job_file", "job_dir", "job_id", "sut"];

/// Why a job command template is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The argv is empty.
    #[error("must not be empty: give at least the program to run")]
    Empty,
    /// The program (first element) is empty.
    #[error("the program (first element) must not be empty")]
    EmptyProgram,
    /// An argument uses a placeholder that does not exist.
    #[error("argument {index} uses unknown placeholder {{{name}}}; known placeholders are {{job_file}}, {{job_dir}}, {{job_id}} and {{sut}} (write {{{{ and }}}} for literal braces)")]
    UnknownPlaceholder {
        /// Index of the argument in the argv.
        index: usize,
        /// The placeholder's name, without braces.
        name: String,
    },
}

/// Values substituted into a [`CommandTemplate`].
#[derive(Debug, Clone, Copy)]
pub struct JobVars<'a> {
    /// `{job_file}`: path of the job file inside the container.
    pub job_file: &'a str,
    /// `{job_dir}`: the job's working directory inside the container.
    pub job_dir: &'a str,
    /// `{job_id}`: the job's id.
    pub job_id: &'a str,
    /// `{sut}`: the SUT's name.
    pub sut: &'a str,
}

/// A validated job argv template: non-empty, non-empty program, only known placeholders.
///
/// `{name}` (letters, digits, `_`) is a placeholder; `{{` and `}}` are literal braces; any other
/// brace is literal too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CommandTemplate(Vec<String>);

enum Tok<'s> {
    Lit(&'s str),
    Var(&'s str),
}

fn tokens(s: &str) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut lit_start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' | b'}' if b.get(i + 1) == Some(&b[i]) => {
                out.push(Tok::Lit(&s[lit_start..=i]));
                i += 2;
                lit_start = i;
            }
            b'{' => {
                let rest = &b[i + 1..];
                let n = rest
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                    .count();
                if n > 0 && rest.get(n) == Some(&b'}') {
                    out.push(Tok::Lit(&s[lit_start..i]));
                    out.push(Tok::Var(&s[i + 1..i + 1 + n]));
                    i += n + 2;
                    lit_start = i;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out.push(Tok::Lit(&s[lit_start..]));
    out
}

impl CommandTemplate {
    /// Checks `argv`, reporting every problem.
    pub fn new(argv: Vec<String>) -> Result<Self, Vec<TemplateError>> {
        let mut errors = Vec::new();
        match argv.first() {
            None => errors.push(TemplateError::Empty),
            Some(p) if p.is_empty() => errors.push(TemplateError::EmptyProgram),
            Some(_) => {}
        }
        for (index, arg) in argv.iter().enumerate() {
            for tok in tokens(arg) {
                if let Tok::Var(name) = tok {
                    if !JOB_PLACEHOLDERS.contains(&name) {
                        errors.push(TemplateError::UnknownPlaceholder {
                            index,
                            name: name.to_owned(),
                        });
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(Self(argv))
        } else {
            Err(errors)
        }
    }

    /// The default job command: `["/bin/sh", "{job_file}"]`.
    pub fn default_command() -> Self {
        Self(vec!["/bin/sh".to_owned(), "{job_file}".to_owned()])
    }

    /// The template as written.
    pub fn args(&self) -> &[String] {
        &self.0
    }

    /// The argv with placeholders substituted and `{{`/`}}` unescaped.
    pub fn render(&self, vars: &JobVars<'_>) -> Vec<String> {
        self.0
            .iter()
            .map(|arg| {
                tokens(arg)
                    .into_iter()
                    .map(|t| match t {
                        Tok::Lit(l) => l.replace("{{", "{").replace("}}", "}"),
                        Tok::Var("job_file") => vars.job_file.to_owned(),
                        Tok::Var("job_dir") => vars.job_dir.to_owned(),
                        Tok::Var("job_id") => vars.job_id.to_owned(),
                        Tok::Var("sut") => vars.sut.to_owned(),
                        // Unreachable for a validated template; kept verbatim.
                        Tok::Var(other) => format!("{{{other}}}"),
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(args: &[&str]) -> Result<CommandTemplate, Vec<TemplateError>> {
        CommandTemplate::new(args.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn renders_placeholders_and_escapes() {
        let vars = JobVars {
            job_file: "/jobs/1/job.yaml",
            job_dir: "/jobs/1",
            job_id: "1",
            sut: "rpi",
        };
        let c = t(&[
            "sh",
            "-c",
            "cd {job_dir} && echo ${{HOME}} {sut}-{job_id} { x }",
            "{job_file}",
        ])
        .unwrap();
        assert_eq!(
            c.render(&vars),
            [
                "sh",
                "-c",
                "cd /jobs/1 && echo ${HOME} rpi-1 { x }",
                "/jobs/1/job.yaml"
            ]
        );
        assert_eq!(
            CommandTemplate::default_command().render(&vars),
            ["/bin/sh", "/jobs/1/job.yaml"]
        );
    }

    #[test]
    fn refuses_unknown_placeholders_and_empty_argv() {
        assert_eq!(t(&[]), Err(vec![TemplateError::Empty]));
        assert_eq!(t(&["", "x"]), Err(vec![TemplateError::EmptyProgram]));
        let e = t(&["sh", "{job}", "${HOME}"]).unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(
            e[0].to_string().contains("unknown placeholder {job}"),
            "{}",
            e[0]
        );
        assert!(e[1].to_string().contains("{HOME}"));
    }
}
