//! Network tests of the listener against real DICOM peers: DCMTK's echoscu, storescu and
//! storescp, pynetdicom, our own SCU, and hostile bytes on a raw socket.

mod dcmtk;
mod helpers;
mod hostile;
mod large;
mod lifecycle;
mod logs;
mod pynetdicom;
mod scu;
mod tls;
