//! `config!`: one declaration gives a configuration struct, its `Default`
//! and its setters, so every `XxxConfig` of the crate looks alike.
//!
//! ```text
//! config! {
//!     /// Settings of [`Sgd`]; defaults are torch.optim.SGD's.
//!     pub struct SgdConfig {
//!         /// Learning rate (torch default 1e-3).
//!         lr: f64 = 1e-3,
//!         /// Gradient clipping applied before each step (default none).
//!         grad_clip: Option<GradClip> = None,
//!     }
//! }
//! ```
//!
//! emits
//!
//! - the struct, `#[non_exhaustive]`, deriving `Debug, Clone, PartialEq`
//!   (more derives go in a `#[derive(...)]` line of the declaration), with
//!   every field `pub` and documented by the doc written above it;
//! - `impl Default`, each field set to the value written after its `=`;
//! - one setter `with_<field>(mut self, v) -> Self` per field. It takes
//!   `impl Into<T>`, so an `Option<T>` field accepts `T` or `None`, an `f64`
//!   field an `f32` and a `String` field a `&str`; fields of a primitive
//!   integer type take the integer itself, so that `with_batch_size(32)`
//!   type-checks (an unsuffixed literal cannot pick one of the many
//!   integer `Into` impls).
//!
//! Setters only set. Validation is hand-written, one `fn validate(&self) ->
//! Result<()>` per config, called by the constructor that takes the config.
//! Every field ends with a comma, the last one too.

/// See the [module docs](self).
macro_rules! config {
    // All fields parsed: emit the struct, its Default and its setters.
    (@munch [$($attr:tt)*] $name:ident
        [$( ([$($doc:expr),*] $f:ident ($t:ty) $kind:ident $d:expr) )*]
    ) => {
        $($attr)*
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                pub $f: $t,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($f: $d,)*
                }
            }
        }

        impl $name {
            $( $crate::config::config!(@setter $kind $f $t); )*
        }
    };
    // A field whose type is one identifier (`f64`, `usize`, `Reduction`):
    // the identifier also picks the setter's kind.
    (@munch $attrs:tt $name:ident [$($acc:tt)*]
        $(#[doc = $doc:expr])* $f:ident : $t:ident = $d:expr, $($rest:tt)*
    ) => {
        $crate::config::config!(@munch $attrs $name
            [$($acc)* ([$($doc),*] $f ($t) $t $d)] $($rest)*);
    };
    // Any other field type (`Option<u64>`, `(f32, f32)`, `Vec<usize>`).
    (@munch $attrs:tt $name:ident [$($acc:tt)*]
        $(#[doc = $doc:expr])* $f:ident : $t:ty = $d:expr, $($rest:tt)*
    ) => {
        $crate::config::config!(@munch $attrs $name
            [$($acc)* ([$($doc),*] $f ($t) __into $d)] $($rest)*);
    };
    (@setter u8 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter u16 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter u32 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter u64 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter usize $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter i8 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter i16 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter i32 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter i64 $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter isize $f:ident $t:ty) => { $crate::config::config!(@plain $f $t); };
    (@setter $kind:ident $f:ident $t:ty) => {
        pastey::paste! {
            #[doc = concat!("Sets [`", stringify!($f), "`](Self::", stringify!($f), ").")]
            pub fn [<with_ $f>](mut self, v: impl Into<$t>) -> Self {
                self.$f = v.into();
                self
            }
        }
    };
    (@plain $f:ident $t:ty) => {
        pastey::paste! {
            #[doc = concat!("Sets [`", stringify!($f), "`](Self::", stringify!($f), ").")]
            pub fn [<with_ $f>](mut self, v: $t) -> Self {
                self.$f = v;
                self
            }
        }
    };
    // Entry point.
    (
        $(#[$attr:meta])*
        pub struct $name:ident { $($body:tt)* }
    ) => {
        $crate::config::config!(@munch [$(#[$attr])*] $name [] $($body)*);
    };
}
pub(crate) use config;

#[cfg(test)]
mod tests {
    config! {
        /// A config exercising every kind of field.
        #[derive(Copy)]
        pub struct DemoConfig {
            /// A float.
            lr: f64 = 1e-3,
            /// An integer.
            batch: usize = 32,
            /// An integer option.
            steps: Option<u64> = None,
            /// A pair.
            size: (usize, usize) = (28, 28),
            /// A flag.
            flag: bool = true,
        }
    }

    config! {
        /// A config with owned, non-`Copy` fields.
        pub struct OwnedConfig {
            /// A name.
            name: String = "x".to_string(),
            /// Weights.
            weight: Option<Vec<f64>> = None,
            /// A short float.
            p: f32 = 0.5,
        }
    }

    #[test]
    fn defaults_are_the_declared_values() {
        let c = DemoConfig::default();
        assert_eq!(c.lr, 1e-3);
        assert_eq!(c.batch, 32);
        assert_eq!(c.steps, None);
        assert_eq!(c.size, (28, 28));
        assert!(c.flag);
        let o = OwnedConfig::default();
        assert_eq!(o.name, "x");
        assert_eq!(o.weight, None);
        assert_eq!(o.p, 0.5);
    }

    #[test]
    fn setters_set_one_field_and_convert() {
        let c = DemoConfig::default()
            .with_lr(0.5f32)
            .with_batch(7)
            .with_steps(9)
            .with_size((3, 4))
            .with_flag(false);
        assert_eq!(c.lr, 0.5);
        assert_eq!(c.batch, 7);
        assert_eq!(c.steps, Some(9));
        assert_eq!(c.size, (3, 4));
        assert!(!c.flag);
        // Copy was derived in addition to Debug, Clone, PartialEq.
        let d = c;
        assert_eq!(d.with_steps(None), DemoConfig { steps: None, ..c });
        let o = OwnedConfig::default()
            .with_name("y")
            .with_weight(vec![1.0, 2.0])
            .with_p(0.25);
        assert_eq!(o.name, "y");
        assert_eq!(o.weight, Some(vec![1.0, 2.0]));
        assert_eq!(o.p, 0.25);
        assert_eq!(format!("{:?}", o.clone()), format!("{o:?}"));
    }
}
